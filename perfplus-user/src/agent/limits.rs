//! What an agent allows: the size of a VM it creates (booted here or arriving from a peer), and how
//! many connections may sit in the handshake at once. Every size a peer or a CLI chooses is checked
//! here before anything is allocated for it.
use anyhow::bail;

/// Largest guest memory by default: 64 GiB.
pub const DEFAULT_MAX_VM_MEMORY: u64 = 64 << 30;
/// Most vCPUs of one VM by default.
pub const DEFAULT_MAX_VCPUS: u8 = 64;
/// Connections in the handshake (not yet authenticated) at once, by default.
pub const DEFAULT_MAX_UNAUTHENTICATED: usize = 64;
/// Connections in the handshake at once from one source address (an IPv6 /64), by default.
pub const DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE: usize = 8;

/// An agent's quotas (`perfplus agent --max-vm-memory` etc.).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentLimits {
    /// Guest memory of one VM at most, in bytes (`VmStart`, and `MigrateBegin` from a peer).
    pub max_vm_memory: u64,
    /// vCPUs of one VM at most.
    pub max_vcpus: u8,
    /// Connections that have not completed the handshake, at most; more are closed at once.
    pub max_unauthenticated: usize,
    /// Of those, from one source address (IPv4 address, IPv6 /64) at most.
    pub max_unauthenticated_per_source: usize,
}

impl Default for AgentLimits {
    fn default() -> Self {
        AgentLimits {
            max_vm_memory: DEFAULT_MAX_VM_MEMORY,
            max_vcpus: DEFAULT_MAX_VCPUS,
            max_unauthenticated: DEFAULT_MAX_UNAUTHENTICATED,
            max_unauthenticated_per_source: DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE,
        }
    }
}

impl AgentLimits {
    /// Checks a VM's size against the quotas, before the VM (or anything sized by it) exists. The
    /// error names the quota and the option that sets it.
    pub fn check_vm(&self, name: &str, memory_bytes: u64, vcpus: u8) -> anyhow::Result<()> {
        if memory_bytes > self.max_vm_memory {
            bail!(
                "creating VM {name}: {} of memory exceeds this agent's quota of {} per VM (--max-vm-memory)",
                size(memory_bytes),
                size(self.max_vm_memory)
            );
        }
        if vcpus > self.max_vcpus {
            bail!(
                "creating VM {name}: {vcpus} vCPUs exceed this agent's quota of {} per VM (--max-vcpus)",
                self.max_vcpus
            );
        }
        Ok(())
    }
}

/// `68719476736` → "64 GiB", `1610612736` → "1.5 GiB", `16777216` → "16 MiB", other sizes in bytes.
fn size(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    if bytes >= GIB {
        if bytes.is_multiple_of(GIB) {
            format!("{} GiB", bytes / GIB)
        } else {
            format!("{:.1} GiB ({bytes} bytes)", bytes as f64 / GIB as f64)
        }
    } else if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_over_the_quota_are_refused_naming_it() {
        let limits = AgentLimits::default();
        limits.check_vm("ok", 64 << 30, 64).unwrap();
        assert_eq!(
            limits.check_vm("big", 1 << 50, 1).unwrap_err().to_string(),
            "creating VM big: 1048576 GiB of memory exceeds this agent's quota of 64 GiB per VM \
             (--max-vm-memory)"
        );
        let small = AgentLimits {
            max_vm_memory: 32 << 20,
            max_vcpus: 2,
            ..AgentLimits::default()
        };
        assert_eq!(
            small.check_vm("a", 48 << 20, 1).unwrap_err().to_string(),
            "creating VM a: 48 MiB of memory exceeds this agent's quota of 32 MiB per VM (--max-vm-memory)"
        );
        assert_eq!(
            small.check_vm("b", 16 << 20, 3).unwrap_err().to_string(),
            "creating VM b: 3 vCPUs exceed this agent's quota of 2 per VM (--max-vcpus)"
        );
        assert_eq!(size(3 << 29), "1.5 GiB (1610612736 bytes)");
        assert_eq!(size(4097), "4097 bytes");
    }
}
