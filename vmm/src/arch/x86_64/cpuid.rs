//! Per-vCPU CPUID: KVM's supported CPUID normalized for our topology (one socket, `n` cores, one
//! thread each), APIC ids, and the hypervisor bit. Pure functions over `kvm_cpuid_entry2`: they
//! never issue an ioctl themselves.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf 1 ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: HTT (the logical-processor count in EBX is valid).
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Topology level types in leaf 0xb/0x1f ECX[15:8].
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Number of APIC-id bits needed to number `count` items.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Rewrites `cpuid` (as returned by `KVM_GET_SUPPORTED_CPUID`) for vCPU `index` of `count`.
pub fn normalize(cpuid: &mut CpuId, index: u8, count: u8) {
    let apic_id = u32::from(index);
    let count = u32::from(count.max(1));
    for entry in cpuid.as_mut_slice() {
        normalize_entry(entry, apic_id, count);
    }
}

fn normalize_entry(entry: &mut kvm_cpuid_entry2, apic_id: u32, count: u32) {
    match entry.function {
        0x1 => {
            // EBX: [31:24] initial APIC id, [23:16] logical processors per package, [15:8]
            // CLFLUSH line size (kept).
            entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (count << 16);
            entry.ecx |= LEAF1_ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= LEAF1_EDX_HTT;
            } else {
                entry.edx &= !LEAF1_EDX_HTT;
            }
        }
        0x4 => {
            // EAX: [31:26] cores per package - 1, [25:14] threads sharing this cache - 1.
            let cache_level = (entry.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 { count - 1 } else { 0 };
            entry.eax = (entry.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
        }
        0xb | 0x1f => {
            entry.edx = apic_id;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = (LEVEL_TYPE_SMT << 8) | entry.index;
                }
                1 => {
                    entry.eax = id_bits(count);
                    entry.ebx = count;
                    entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ebx: 0x0008_0800, ..Default::default() }
    }

    #[test]
    fn leaf1_carries_apic_id_and_count() {
        let mut e = entry(1, 0);
        normalize_entry(&mut e, 3, 4);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!(e.ebx & 0xffff, 0x0800);
        assert_ne!(e.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn topology_leaf_numbers_cores() {
        let mut e = entry(0xb, 1);
        normalize_entry(&mut e, 2, 3);
        assert_eq!((e.eax, e.ebx, e.edx), (2, 3, 2));
        assert_eq!(e.ecx >> 8, LEVEL_TYPE_CORE);
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(32), 5);
    }
}
