//! LAPIC local-interrupt setup: LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as a PC
//! BIOS leaves them. It never touches the in-kernel irqchip (`vstate::vm` owns it).

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

const APIC_LVT0_OFFSET: usize = 0x350;
const APIC_LVT1_OFFSET: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn get_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *b as _;
    }
}

/// Sets the delivery mode (bits 10:8) of an LVT entry, keeping the rest.
fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Programs LINT0 = ExtINT and LINT1 = NMI on `vcpu`'s in-kernel LAPIC.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut lapic = vcpu.get_lapic()?;
    let lvt0 = get_reg(&lapic, APIC_LVT0_OFFSET);
    set_reg(&mut lapic, APIC_LVT0_OFFSET, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get_reg(&lapic, APIC_LVT1_OFFSET);
    set_reg(&mut lapic, APIC_LVT1_OFFSET, with_delivery_mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_replaces_only_bits_10_to_8() {
        assert_eq!(with_delivery_mode(0x0001_0000, APIC_MODE_EXTINT), 0x0001_0700);
        assert_eq!(with_delivery_mode(0x0000_07ff, APIC_MODE_NMI), 0x0000_04ff);
    }
}
