//! Reset sources: the i8042 keyboard controller (ports 0x60-0x64) with a minimal PS/2 keyboard
//! and no mouse, answering every command Linux's probe sends at once (so neither the i8042 nor
//! the atkbd probe ever waits for a timeout, and nothing blocks the root mount), and turning
//! "pulse reset line" into a clean stop; plus the 0xcf9 reset-control register. They only raise
//! a [`StopRequest`]; stopping the VM is the vCPU loop's job. The keyboard never types: it only
//! answers what it is asked, on IRQ 1.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::persist::Persist;

/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// Legacy IRQ (and GSI) of the keyboard port.
pub const I8042_KBD_GSI: u32 = 1;
/// i8042 ports covered: 0x60..=0x64.
pub const I8042_PORT_COUNT: u16 = 5;
/// Offset of the data port (0x60) from 0x60.
const DATA_OFFSET: u64 = 0;
/// Offset of the command/status port (0x64) from 0x60.
const COMMAND_OFFSET: u64 = 4;

// Controller commands written to port 0x64 (Linux drivers/input/serio/i8042.h).
/// Read the control register (CTR) into the output buffer.
const CMD_READ_CTR: u8 = 0x20;
/// Write the next data byte into the CTR.
const CMD_WRITE_CTR: u8 = 0x60;
/// Disable the aux (mouse) interface.
const CMD_AUX_DISABLE: u8 = 0xa7;
/// Enable the aux interface.
const CMD_AUX_ENABLE: u8 = 0xa8;
/// Aux interface test: 0x00 = fine, 0x01-0x03 = clock/data line stuck.
const CMD_AUX_TEST: u8 = 0xa9;
/// Controller self test: answers [`SELF_TEST_PASSED`].
const CMD_SELF_TEST: u8 = 0xaa;
/// Keyboard interface test: 0x00 = fine.
const CMD_KBD_TEST: u8 = 0xab;
/// Disable the keyboard interface.
const CMD_KBD_DISABLE: u8 = 0xad;
/// Enable the keyboard interface.
const CMD_KBD_ENABLE: u8 = 0xae;
/// Read the output port into the output buffer.
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
/// Write the next data byte to the output port.
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
/// Put the next data byte into the output buffer as if the keyboard sent it.
const CMD_WRITE_KBD_BUFFER: u8 = 0xd2;
/// Put the next data byte into the output buffer as if the mouse sent it (loopback test).
const CMD_AUX_LOOP: u8 = 0xd3;
/// Send the next data byte to the mouse.
const CMD_WRITE_AUX: u8 = 0xd4;
/// "Pulse output line 0" = CPU reset.
const CMD_RESET_CPU: u8 = 0xfe;

/// Reset-control register port.
pub const RESET_CONTROL_PORT: u16 = 0xcf9;
/// Bit 2 of 0xcf9: perform the reset.
const RESET_CONTROL_RESET_BIT: u8 = 1 << 2;

// PS/2 keyboard commands (bytes written to port 0x60 with no controller command pending) and
// answers (Linux include/linux/libps2.h, drivers/input/keyboard/atkbd.c).
/// Acknowledge: every command and parameter byte gets one.
const KBD_ACK: u8 = 0xfa;
/// Reset and self test: ACK, then [`KBD_SELF_TEST_PASSED`].
const KBD_CMD_RESET: u8 = 0xff;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
/// Identify: ACK, then the two bytes of [`KBD_ID_MF2`].
const KBD_CMD_GET_ID: u8 = 0xf2;
/// An MF2 keyboard's id, as the two bytes that follow the ACK.
const KBD_ID_MF2: [u8; 2] = [0xab, 0x83];
/// Echo: answered by itself, without an ACK.
const KBD_CMD_ECHO: u8 = 0xee;
/// Commands followed by one parameter byte (LEDs, scan-code set, typematic rate).
const KBD_CMD_SET_LEDS: u8 = 0xed;
const KBD_CMD_SCANCODE_SET: u8 = 0xf0;
const KBD_CMD_SET_RATE: u8 = 0xf3;
/// The scan-code set we report for "get current set" (`0xf0 0x00`).
const KBD_SCANCODE_SET: u8 = 2;
/// Most keyboard answer bytes queued at once (a real controller holds one; the keyboard a few).
const KBD_QUEUE_BYTES: usize = 16;

/// Self-test answer of a healthy controller.
const SELF_TEST_PASSED: u8 = 0x55;
/// Interface-test answer: fine.
const INTERFACE_TEST_PASSED: u8 = 0x00;
/// Interface-test answer "clock line stuck high": what a port with nothing behind it reports.
const INTERFACE_TEST_NO_DEVICE: u8 = 0x02;

// Status register bits (port 0x64 reads).
/// Output buffer full: a byte waits at port 0x60.
const STATUS_OUTPUT_FULL: u8 = 0x01;
/// System flag: the power-on self test passed.
const STATUS_SYSTEM_FLAG: u8 = 0x04;
/// The last write went to the command port.
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
/// Keyboard not locked.
const STATUS_KBD_UNLOCKED: u8 = 0x10;
/// The byte in the output buffer came from the aux port.
const STATUS_AUX_DATA: u8 = 0x20;

// Control register bits.
/// Keyboard interrupt enabled.
const CTR_KBD_INT: u8 = 0x01;
/// System flag (POST passed).
const CTR_SYSTEM_FLAG: u8 = 0x04;
/// Keyboard interface disabled.
const CTR_KBD_DISABLED: u8 = 0x10;
/// Aux interface disabled.
const CTR_AUX_DISABLED: u8 = 0x20;
/// CTR after power-on: keyboard interrupt on, POST passed, aux off.
const CTR_AT_POWER_ON: u8 = CTR_KBD_INT | CTR_SYSTEM_FLAG | CTR_AUX_DISABLED;
/// Output port after power-on: bit 0 (reset line) and bit 1 (A20 gate) high.
const OUTPUT_PORT_AT_POWER_ON: u8 = 0x03;

/// How a device asked for the VM to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ResetSource {
    /// `outb 0xfe, 0x64`.
    I8042,
    /// `outb 0x6/0xe, 0xcf9`.
    ResetControl,
}

/// A latch set by a device and taken by the vCPU that handled the access.
#[derive(Debug, Default)]
pub struct StopRequest(Mutex<Option<ResetSource>>);

impl StopRequest {
    /// Records a reset request (the first one wins).
    pub fn request(&self, source: ResetSource) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(source);
    }

    /// Takes a pending request.
    pub fn take(&self) -> Option<ResetSource> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The i8042 controller with a keyboard that only answers, and an empty mouse port.
#[derive(Debug)]
pub struct I8042 {
    stop: Arc<StopRequest>,
    /// Raised when a keyboard answer waits and the guest enabled the keyboard interrupt.
    kbd_irq: Option<EventFd>,
    /// The control register ("command byte").
    control: u8,
    /// The output port (reset line, A20).
    output_port: u8,
    /// The byte waiting at port 0x60, and whether it came from the aux port.
    output: Option<(u8, bool)>,
    /// Keyboard answer bytes behind `output`.
    kbd_queue: VecDeque<u8>,
    /// The keyboard command whose parameter byte comes next.
    kbd_awaiting_parameter: Option<u8>,
    /// A command written to 0x64 that takes its parameter from the next 0x60 write.
    awaiting_parameter: Option<u8>,
    /// Whether the last write went to the command port (status bit 3).
    last_was_command: bool,
}

impl I8042 {
    /// A controller in its power-on state that raises `stop` on a reset command. Without
    /// [`I8042::with_kbd_irq`] the keyboard stays silent (its answers need IRQ 1).
    pub fn new(stop: Arc<StopRequest>) -> Self {
        Self {
            stop,
            kbd_irq: None,
            kbd_queue: VecDeque::new(),
            kbd_awaiting_parameter: None,
            control: CTR_AT_POWER_ON,
            output_port: OUTPUT_PORT_AT_POWER_ON,
            output: None,
            awaiting_parameter: None,
            last_was_command: false,
        }
    }

    /// Gives the keyboard its interrupt line (an irqfd on [`I8042_KBD_GSI`]).
    pub fn with_kbd_irq(mut self, irq: EventFd) -> Self {
        self.kbd_irq = Some(irq);
        self
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_SYSTEM_FLAG | STATUS_KBD_UNLOCKED;
        if let Some((_, from_aux)) = self.output {
            status |= STATUS_OUTPUT_FULL;
            if from_aux {
                status |= STATUS_AUX_DATA;
            }
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    /// Replaces the output buffer: a controller answer always wins over unread bytes.
    fn answer(&mut self, byte: u8) {
        self.kbd_queue.clear();
        self.output = Some((byte, false));
    }

    /// Queues keyboard answer bytes and raises IRQ 1 if the buffer was empty.
    fn kbd_answer(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if self.kbd_queue.len() < KBD_QUEUE_BYTES {
                self.kbd_queue.push_back(byte);
            }
        }
        if self.output.is_none() {
            self.next_kbd_byte();
        }
    }

    /// Moves the next queued keyboard byte into the output buffer and signals it.
    fn next_kbd_byte(&mut self) {
        if let Some(byte) = self.kbd_queue.pop_front() {
            self.output = Some((byte, false));
            if self.control & CTR_KBD_INT != 0 {
                if let Some(irq) = &self.kbd_irq {
                    // A full eventfd counter still means "raised"; nothing to do on error.
                    let _ = irq.write(1);
                }
            }
        }
    }

    /// A byte for the keyboard. Without an interrupt line the keyboard is absent: no answer.
    fn kbd_command(&mut self, byte: u8) {
        if self.kbd_irq.is_none() {
            return;
        }
        if let Some(command) = self.kbd_awaiting_parameter.take() {
            if command == KBD_CMD_SCANCODE_SET && byte == 0 {
                self.kbd_answer(&[KBD_ACK, KBD_SCANCODE_SET]);
            } else {
                self.kbd_answer(&[KBD_ACK]);
            }
            return;
        }
        match byte {
            KBD_CMD_RESET => self.kbd_answer(&[KBD_ACK, KBD_SELF_TEST_PASSED]),
            KBD_CMD_GET_ID => self.kbd_answer(&[KBD_ACK, KBD_ID_MF2[0], KBD_ID_MF2[1]]),
            KBD_CMD_ECHO => self.kbd_answer(&[KBD_CMD_ECHO]),
            KBD_CMD_SET_LEDS | KBD_CMD_SCANCODE_SET | KBD_CMD_SET_RATE => {
                self.kbd_awaiting_parameter = Some(byte);
                self.kbd_answer(&[KBD_ACK]);
            }
            // Enable, disable, set defaults and the rest: acknowledged, nothing changes.
            _ => self.kbd_answer(&[KBD_ACK]),
        }
    }

    fn command(&mut self, command: u8) {
        self.last_was_command = true;
        self.awaiting_parameter = None;
        match command {
            CMD_READ_CTR => self.answer(self.control),
            CMD_READ_OUTPUT_PORT => self.answer(self.output_port),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT | CMD_WRITE_KBD_BUFFER | CMD_AUX_LOOP | CMD_WRITE_AUX => {
                self.awaiting_parameter = Some(command)
            }
            CMD_AUX_DISABLE => self.control |= CTR_AUX_DISABLED,
            CMD_AUX_ENABLE => self.control &= !CTR_AUX_DISABLED,
            CMD_KBD_DISABLE => self.control |= CTR_KBD_DISABLED,
            CMD_KBD_ENABLE => self.control &= !CTR_KBD_DISABLED,
            CMD_SELF_TEST => self.answer(SELF_TEST_PASSED),
            CMD_KBD_TEST => self.answer(INTERFACE_TEST_PASSED),
            CMD_AUX_TEST => self.answer(INTERFACE_TEST_NO_DEVICE),
            CMD_RESET_CPU => self.stop.request(ResetSource::I8042),
            // Other commands (password, pulse other lines, read input port) do nothing here.
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        self.last_was_command = false;
        match self.awaiting_parameter.take() {
            Some(CMD_WRITE_CTR) => self.control = byte,
            Some(CMD_WRITE_OUTPUT_PORT) => self.output_port = byte,
            Some(CMD_WRITE_KBD_BUFFER) => self.answer(byte),
            // There is no mouse: the loopback answer arrives without the aux-data flag, which
            // Linux reads as "no aux port" at once (instead of waiting for its timeout).
            Some(CMD_AUX_LOOP) => self.answer(byte),
            // A byte for the mouse: nothing is plugged in, nobody answers.
            Some(_) => {}
            None => self.kbd_command(byte),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(first) = data.first_mut() else {
            return;
        };
        match offset {
            COMMAND_OFFSET => *first = self.status(),
            DATA_OFFSET => {
                *first = self.output.take().map_or(0, |(byte, _)| byte);
                self.next_kbd_byte();
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else {
            return;
        };
        match offset {
            COMMAND_OFFSET => self.command(byte),
            DATA_OFFSET => self.data(byte),
            _ => {}
        }
    }
}

/// Why a saved i8042 or reset-control state was refused.
#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    #[error("saved i8042 state queues {got} keyboard bytes, more than the {KBD_QUEUE_BYTES} it can hold")]
    KbdQueue { got: usize },
}

/// The i8042 registers a snapshot keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    pub control: u8,
    pub output_port: u8,
    /// The byte waiting at port 0x60, and whether it came from the aux port.
    pub output: Option<(u8, bool)>,
    pub kbd_queue: Vec<u8>,
    pub kbd_awaiting_parameter: Option<u8>,
    pub awaiting_parameter: Option<u8>,
    pub last_was_command: bool,
}

/// What a restored i8042 needs live: where it asks for a stop, and its keyboard interrupt line.
#[derive(Debug)]
pub struct I8042Args {
    pub stop: Arc<StopRequest>,
    pub kbd_irq: Option<EventFd>,
}

impl Persist for I8042 {
    type State = I8042State;
    type ConstructorArgs = I8042Args;
    type Error = I8042Error;

    fn save(&self) -> I8042State {
        I8042State {
            control: self.control,
            output_port: self.output_port,
            output: self.output,
            kbd_queue: self.kbd_queue.iter().copied().collect(),
            kbd_awaiting_parameter: self.kbd_awaiting_parameter,
            awaiting_parameter: self.awaiting_parameter,
            last_was_command: self.last_was_command,
        }
    }

    fn restore(args: I8042Args, state: &I8042State) -> Result<Self, I8042Error> {
        if state.kbd_queue.len() > KBD_QUEUE_BYTES {
            return Err(I8042Error::KbdQueue { got: state.kbd_queue.len() });
        }
        Ok(Self {
            stop: args.stop,
            kbd_irq: args.kbd_irq,
            control: state.control,
            output_port: state.output_port,
            output: state.output,
            kbd_queue: state.kbd_queue.iter().copied().collect(),
            kbd_awaiting_parameter: state.kbd_awaiting_parameter,
            awaiting_parameter: state.awaiting_parameter,
            last_was_command: state.last_was_command,
        })
    }
}

/// The 0xcf9 reset-control register.
#[derive(Debug)]
pub struct ResetControl {
    stop: Arc<StopRequest>,
    value: u8,
}

impl ResetControl {
    /// A register that raises `stop` when the reset bit is written.
    pub fn new(stop: Arc<StopRequest>) -> Self {
        Self { stop, value: 0 }
    }
}

/// The reset-control register a snapshot keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetControlState {
    pub value: u8,
}

impl Persist for ResetControl {
    type State = ResetControlState;
    /// Where the restored register asks for a stop.
    type ConstructorArgs = Arc<StopRequest>;
    type Error = I8042Error;

    fn save(&self) -> ResetControlState {
        ResetControlState { value: self.value }
    }

    fn restore(stop: Arc<StopRequest>, state: &ResetControlState) -> Result<Self, I8042Error> {
        Ok(Self { stop, value: state.value & !RESET_CONTROL_RESET_BIT })
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.value;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            self.value = v & !RESET_CONTROL_RESET_BIT;
            if v & RESET_CONTROL_RESET_BIT != 0 {
                self.stop.request(ResetSource::ResetControl);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> (I8042, Arc<StopRequest>) {
        let stop = Arc::new(StopRequest::default());
        (I8042::new(stop.clone()), stop)
    }

    fn status(kbd: &mut I8042) -> u8 {
        let mut b = [0xffu8];
        kbd.read(COMMAND_OFFSET, &mut b);
        b[0]
    }

    fn read_data(kbd: &mut I8042) -> u8 {
        let mut b = [0xffu8];
        kbd.read(DATA_OFFSET, &mut b);
        b[0]
    }

    /// What Linux's `i8042_command` does: write the command, then wait for the output buffer.
    fn command_answer(kbd: &mut I8042, command: u8) -> Option<u8> {
        kbd.write(COMMAND_OFFSET, &[command]);
        (status(kbd) & STATUS_OUTPUT_FULL != 0).then(|| read_data(kbd))
    }

    #[test]
    fn an_i8042_mid_conversation_round_trips_and_answers_on() {
        let (kbd, stop) = controller();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut kbd = kbd.with_kbd_irq(irq.try_clone().unwrap());
        kbd.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        kbd.write(DATA_OFFSET, &[0x47]);
        // GET_ID: ACK waits in the output buffer, the two id bytes behind it.
        kbd.write(DATA_OFFSET, &[KBD_CMD_GET_ID]);
        let args = I8042Args { stop: stop.clone(), kbd_irq: Some(irq.try_clone().unwrap()) };
        let mut restored = crate::persist::test_util::round_trip(&kbd, args);
        assert_eq!(read_data(&mut restored), KBD_ACK);
        assert_eq!(read_data(&mut restored), KBD_ID_MF2[0]);
        assert_eq!(read_data(&mut restored), KBD_ID_MF2[1]);
        assert_eq!(command_answer(&mut restored, CMD_READ_CTR), Some(0x47));
        restored.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(stop.take(), Some(ResetSource::I8042), "the restored controller still resets");

        let mut rc = ResetControl::new(stop.clone());
        rc.write(0, &[0x2]);
        let mut rc = crate::persist::test_util::round_trip(&rc, stop.clone());
        let mut value = [0u8];
        rc.read(0, &mut value);
        assert_eq!(value, [0x2]);
        rc.write(0, &[0x6]);
        assert_eq!(stop.take(), Some(ResetSource::ResetControl));
    }

    #[test]
    fn a_saved_i8042_with_an_overlong_queue_is_refused() {
        let (kbd, stop) = controller();
        let mut state = kbd.save();
        state.kbd_queue = vec![0; KBD_QUEUE_BYTES + 1];
        let err = I8042::restore(I8042Args { stop, kbd_irq: None }, &state).unwrap_err();
        assert!(err.to_string().contains("keyboard bytes"), "{err}");
    }

    #[test]
    fn only_the_reset_command_raises_a_stop() {
        let (mut kbd, stop) = controller();
        kbd.write(DATA_OFFSET, &[CMD_RESET_CPU]);
        kbd.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        kbd.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(stop.take(), None);
        kbd.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(stop.take(), Some(ResetSource::I8042));
        let mut rc = ResetControl::new(stop.clone());
        rc.write(0, &[0x2]);
        assert_eq!(stop.take(), None);
        rc.write(0, &[0x6]);
        assert_eq!(stop.take(), Some(ResetSource::ResetControl));
    }

    #[test]
    fn the_control_register_reads_back_what_was_written() {
        let (mut kbd, _) = controller();
        assert_eq!(status(&mut kbd) & STATUS_OUTPUT_FULL, 0, "idle buffer is empty");
        assert_eq!(command_answer(&mut kbd, CMD_READ_CTR), Some(CTR_AT_POWER_ON));
        assert_eq!(status(&mut kbd) & STATUS_OUTPUT_FULL, 0, "reading empties it");
        kbd.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        assert_ne!(status(&mut kbd) & STATUS_LAST_WAS_COMMAND, 0);
        kbd.write(DATA_OFFSET, &[0x47]);
        assert_eq!(status(&mut kbd) & STATUS_LAST_WAS_COMMAND, 0);
        assert_eq!(command_answer(&mut kbd, CMD_READ_CTR), Some(0x47));
        kbd.write(COMMAND_OFFSET, &[CMD_KBD_ENABLE]);
        kbd.write(COMMAND_OFFSET, &[CMD_AUX_DISABLE]);
        assert_eq!(command_answer(&mut kbd, CMD_READ_CTR), Some(0x47 & !CTR_KBD_DISABLED | CTR_AUX_DISABLED));
        kbd.write(COMMAND_OFFSET, &[CMD_WRITE_OUTPUT_PORT]);
        kbd.write(DATA_OFFSET, &[0x01]);
        assert_eq!(command_answer(&mut kbd, CMD_READ_OUTPUT_PORT), Some(0x01));
    }

    #[test]
    fn self_tests_answer_at_once() {
        let (mut kbd, stop) = controller();
        assert_eq!(command_answer(&mut kbd, CMD_SELF_TEST), Some(SELF_TEST_PASSED));
        assert_eq!(command_answer(&mut kbd, CMD_KBD_TEST), Some(INTERFACE_TEST_PASSED));
        assert_eq!(command_answer(&mut kbd, CMD_AUX_TEST), Some(INTERFACE_TEST_NO_DEVICE));
        assert_eq!(stop.take(), None);
    }

    #[test]
    fn aux_loopback_answers_without_the_aux_flag_so_linux_sees_no_mouse() {
        let (mut kbd, _) = controller();
        kbd.write(COMMAND_OFFSET, &[CMD_AUX_LOOP]);
        kbd.write(DATA_OFFSET, &[0x5a]);
        let s = status(&mut kbd);
        assert_ne!(s & STATUS_OUTPUT_FULL, 0);
        assert_eq!(s & STATUS_AUX_DATA, 0);
        // A new command replaces the unread loopback byte.
        assert_eq!(command_answer(&mut kbd, CMD_AUX_TEST), Some(INTERFACE_TEST_NO_DEVICE));
    }

    #[test]
    fn the_keyboard_answers_what_atkbd_asks_one_interrupt_per_byte() {
        let (kbd, _) = controller();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut kbd = kbd.with_kbd_irq(irq.try_clone().unwrap());
        // With the keyboard interrupt off, answers wait silently.
        kbd.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        kbd.write(DATA_OFFSET, &[CTR_AT_POWER_ON & !CTR_KBD_INT]);
        kbd.write(DATA_OFFSET, &[KBD_CMD_ECHO]);
        assert!(irq.read().is_err(), "no interrupt while KBD_INT is off");
        assert_eq!(read_data(&mut kbd), KBD_CMD_ECHO);
        kbd.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        kbd.write(DATA_OFFSET, &[CTR_AT_POWER_ON]);

        kbd.write(DATA_OFFSET, &[KBD_CMD_GET_ID]);
        for expected in [KBD_ACK, KBD_ID_MF2[0], KBD_ID_MF2[1]] {
            assert_eq!(irq.read().unwrap(), 1, "one interrupt before {expected:#x}");
            assert_ne!(status(&mut kbd) & STATUS_OUTPUT_FULL, 0);
            assert_eq!(read_data(&mut kbd), expected);
        }
        assert!(irq.read().is_err(), "no interrupt once the queue is empty");
        assert_eq!(status(&mut kbd) & STATUS_OUTPUT_FULL, 0);

        // A command with a parameter: both bytes are acknowledged; "get scan-code set" answers.
        kbd.write(DATA_OFFSET, &[KBD_CMD_SCANCODE_SET]);
        assert_eq!(read_data(&mut kbd), KBD_ACK);
        kbd.write(DATA_OFFSET, &[0]);
        assert_eq!(read_data(&mut kbd), KBD_ACK);
        assert_eq!(read_data(&mut kbd), KBD_SCANCODE_SET);
        kbd.write(DATA_OFFSET, &[KBD_CMD_RESET]);
        assert_eq!(read_data(&mut kbd), KBD_ACK);
        assert_eq!(read_data(&mut kbd), KBD_SELF_TEST_PASSED);
        // A flood of commands without reads stays bounded.
        for _ in 0..100 {
            kbd.write(DATA_OFFSET, &[KBD_CMD_GET_ID]);
        }
        assert!(kbd.kbd_queue.len() <= KBD_QUEUE_BYTES);
        // A controller command discards unread keyboard bytes.
        assert_eq!(command_answer(&mut kbd, CMD_SELF_TEST), Some(SELF_TEST_PASSED));
        assert_eq!(status(&mut kbd) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn bytes_for_absent_devices_get_no_answer() {
        let (mut kbd, _) = controller();
        kbd.write(DATA_OFFSET, &[KBD_CMD_GET_ID]); // no interrupt line: no keyboard
        kbd.write(COMMAND_OFFSET, &[CMD_WRITE_AUX]);
        kbd.write(DATA_OFFSET, &[0xf4]); // mouse "enable"
        assert_eq!(status(&mut kbd) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read_data(&mut kbd), 0);
        kbd.write(COMMAND_OFFSET, &[CMD_WRITE_KBD_BUFFER]);
        kbd.write(DATA_OFFSET, &[0x1c]);
        assert_eq!(read_data(&mut kbd), 0x1c);
        // Empty accesses and other ports are ignored.
        kbd.write(COMMAND_OFFSET, &[]);
        kbd.read(COMMAND_OFFSET, &mut []);
        kbd.write(2, &[CMD_RESET_CPU]);
    }
}
