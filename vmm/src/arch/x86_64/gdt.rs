//! The boot GDT and the matching segment descriptors for `KVM_SET_SREGS`. Pure values: it never
//! writes guest memory or vCPU state itself.

use kvm_bindings::kvm_segment;

/// GDT entries: null, null, 64-bit code (selector 0x10), data (selector 0x18), TSS (0x20).
pub const BOOT_GDT: [u64; 5] =
    [0, 0, gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)];
/// Selector of the 64-bit code segment.
pub const CODE_SELECTOR: u16 = 0x10;
/// Selector of the data segment.
pub const DATA_SELECTOR: u16 = 0x18;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x20;

/// Packs a GDT entry from its flags (`0xFxTT`: granularity/size nibble, access byte), base and
/// limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The `kvm_segment` that KVM expects for GDT entry `entry` at table index `index`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: {
            let limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
            // With 4 KiB granularity the limit counts pages.
            if (entry >> 55) & 1 == 1 {
                (limit << 12) | 0xfff
            } else {
                limit
            }
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from((entry >> 47) & 1 == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_ring0_present() {
        let cs = kvm_segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!(cs.selector, CODE_SELECTOR);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.present, cs.type_, cs.s), (1, 0, 0, 1, 0xb, 1));
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = kvm_segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!(ds.selector, DATA_SELECTOR);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
    }
}
