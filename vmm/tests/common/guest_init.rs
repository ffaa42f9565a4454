//! The `/init` of the Linux test guests: a static x86-64 ELF assembled here, a few syscalls
//! long. It prints [`INIT_MARKER`](super::INIT_MARKER) on the console, optionally sleeps (so a
//! test can pause it mid-run), prints [`INIT_DONE`](super::INIT_DONE), then reboots (with
//! `reboot=k` the VMM sees an i8042 reset) or exits, which panics the kernel ("Attempted to
//! kill init"). Each line is drained to the UART (`tcdrain`) before the program goes on.

use std::time::Duration;

/// Where the program is loaded.
const LOAD_ADDR: u64 = 0x40_0000;
const EHDR_BYTES: usize = 64;
const PHDR_BYTES: usize = 56;

const SYS_WRITE: u32 = 1;
const SYS_IOCTL: u32 = 16;
/// `TCSBRK` with a non-zero argument is `tcdrain`: it returns once the tty has sent what was
/// written (include/uapi/asm-generic/ioctls.h). Without it, console output written just before
/// a reboot or exit can be lost in the tty's buffer.
const TCSBRK: u32 = 0x5409;
const SYS_NANOSLEEP: u32 = 35;
const SYS_EXIT: u32 = 60;
const SYS_REBOOT: u32 = 169;
/// `LINUX_REBOOT_MAGIC1`, `LINUX_REBOOT_MAGIC2` and `LINUX_REBOOT_CMD_RESTART`
/// (include/uapi/linux/reboot.h).
const REBOOT_MAGIC1: u32 = 0xfee1_dead;
const REBOOT_MAGIC2: u32 = 0x2812_1969;
const REBOOT_CMD_RESTART: u32 = 0x0123_4567;

/// How the init ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitEnd {
    /// `reboot(RESTART)`.
    Reboot,
    /// `exit(0)`: PID 1 exits and the kernel panics.
    Exit,
}

/// What the test guest's init does after printing the marker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestInit {
    /// How long it sleeps before printing the done line.
    pub linger: Duration,
    pub end: InitEnd,
}

impl TestInit {
    /// Print, reboot.
    pub const REBOOT: Self = Self { linger: Duration::ZERO, end: InitEnd::Reboot };
    /// Print, exit (a kernel panic).
    pub const EXIT: Self = Self { linger: Duration::ZERO, end: InitEnd::Exit };

    /// Print, sleep `linger`, print again, reboot.
    pub const fn lingering(linger: Duration) -> Self {
        Self { linger, end: InitEnd::Reboot }
    }
}

/// Machine code with RIP-relative references to data placed after it.
struct Asm {
    code: Vec<u8>,
    /// (offset of a rel32 in `code`, index into `data`)
    fixups: Vec<(usize, usize)>,
    data: Vec<Vec<u8>>,
}

impl Asm {
    fn mov_eax(&mut self, v: u32) {
        self.code.push(0xb8);
        self.code.extend(v.to_le_bytes());
    }
    fn mov_edi(&mut self, v: u32) {
        self.code.push(0xbf);
        self.code.extend(v.to_le_bytes());
    }
    fn mov_esi(&mut self, v: u32) {
        self.code.push(0xbe);
        self.code.extend(v.to_le_bytes());
    }
    fn mov_edx(&mut self, v: u32) {
        self.code.push(0xba);
        self.code.extend(v.to_le_bytes());
    }
    /// `lea rsi, [rip + data]` (`reg` 0x35) or `lea rdi, [rip + data]` (0x3d).
    fn lea_data(&mut self, reg: u8, data: Vec<u8>) {
        self.code.extend([0x48, 0x8d, reg]);
        self.fixups.push((self.code.len(), self.data.len()));
        self.code.extend([0; 4]);
        self.data.push(data);
    }
    fn syscall(&mut self) {
        self.code.extend([0x0f, 0x05]);
    }
    /// `write(1, text)`, then `tcdrain(1)`.
    fn write_stdout(&mut self, text: &str) {
        self.mov_eax(SYS_WRITE);
        self.mov_edi(1);
        self.lea_data(0x35, text.as_bytes().to_vec());
        self.mov_edx(text.len() as u32);
        self.syscall();
        self.mov_eax(SYS_IOCTL);
        self.mov_edi(1);
        self.mov_esi(TCSBRK);
        self.mov_edx(1);
        self.syscall();
    }

    /// Code then data (each 8-aligned), with every reference resolved for `base`.
    fn link(mut self) -> Vec<u8> {
        let mut offsets = Vec::new();
        let mut out_len = self.code.len().next_multiple_of(8);
        for d in &self.data {
            offsets.push(out_len);
            out_len = (out_len + d.len()).next_multiple_of(8);
        }
        for &(at, index) in &self.fixups {
            let rel = offsets[index] as i64 - (at as i64 + 4);
            self.code[at..at + 4].copy_from_slice(&(rel as i32).to_le_bytes());
        }
        let mut out = self.code;
        for (d, at) in self.data.iter().zip(offsets) {
            out.resize(at, 0);
            out.extend(d);
        }
        out
    }
}

/// The program's instructions and data.
fn program(init: &TestInit) -> Vec<u8> {
    let mut asm = Asm { code: Vec::new(), fixups: Vec::new(), data: Vec::new() };
    asm.write_stdout(&format!("{}\n", super::INIT_MARKER));
    if !init.linger.is_zero() {
        let mut timespec = (init.linger.as_secs() as i64).to_le_bytes().to_vec();
        timespec.extend(i64::from(init.linger.subsec_nanos()).to_le_bytes());
        asm.mov_eax(SYS_NANOSLEEP);
        asm.lea_data(0x3d, timespec);
        asm.code.extend([0x31, 0xf6]); // xor esi, esi
        asm.syscall();
    }
    asm.write_stdout(&format!("{}\n", super::INIT_DONE));
    if init.end == InitEnd::Reboot {
        asm.mov_eax(SYS_REBOOT);
        asm.mov_edi(REBOOT_MAGIC1);
        asm.mov_esi(REBOOT_MAGIC2);
        asm.mov_edx(REBOOT_CMD_RESTART);
        asm.code.extend([0x45, 0x31, 0xd2]); // xor r10d, r10d
        asm.syscall();
    }
    // exit(0), also if the reboot failed; then spin (never reached).
    asm.mov_eax(SYS_EXIT);
    asm.code.extend([0x31, 0xff]); // xor edi, edi
    asm.syscall();
    asm.code.extend([0xeb, 0xfe]);
    asm.link()
}

/// The whole static ELF executable.
pub fn init_elf(init: &TestInit) -> Vec<u8> {
    let body = program(init);
    let headers = EHDR_BYTES + PHDR_BYTES;
    let total = (headers + body.len()) as u64;
    let mut elf = Vec::with_capacity(headers + body.len());
    elf.extend([0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend(1u32.to_le_bytes());
    elf.extend((LOAD_ADDR + headers as u64).to_le_bytes()); // e_entry
    elf.extend((EHDR_BYTES as u64).to_le_bytes()); // e_phoff
    elf.extend(0u64.to_le_bytes()); // e_shoff
    elf.extend(0u32.to_le_bytes()); // e_flags
    elf.extend((EHDR_BYTES as u16).to_le_bytes());
    elf.extend((PHDR_BYTES as u16).to_le_bytes());
    elf.extend(1u16.to_le_bytes()); // e_phnum
    elf.extend(64u16.to_le_bytes()); // e_shentsize
    elf.extend(0u16.to_le_bytes()); // e_shnum
    elf.extend(0u16.to_le_bytes()); // e_shstrndx
    elf.extend(1u32.to_le_bytes()); // PT_LOAD
    elf.extend(5u32.to_le_bytes()); // R+X
    elf.extend(0u64.to_le_bytes()); // p_offset: the headers are loaded too
    elf.extend(LOAD_ADDR.to_le_bytes()); // p_vaddr
    elf.extend(LOAD_ADDR.to_le_bytes()); // p_paddr
    elf.extend(total.to_le_bytes()); // p_filesz
    elf.extend(total.to_le_bytes()); // p_memsz
    elf.extend(0x1000u64.to_le_bytes()); // p_align
    assert_eq!(elf.len(), headers);
    elf.extend(body);
    elf
}
