//! What an agent allows: how many connections may sit in the handshake at once.

/// Connections in the handshake (not yet authenticated) at once, by default.
pub const DEFAULT_MAX_UNAUTHENTICATED: usize = 64;
/// Connections in the handshake at once from one source address (an IPv6 /64), by default.
pub const DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE: usize = 8;

/// An agent's quotas (`perfplus agent --max-unauthenticated` etc.).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentLimits {
    /// Connections that have not completed the handshake, at most; more are closed at once.
    pub max_unauthenticated: usize,
    /// Of those, from one source address (IPv4 address, IPv6 /64) at most.
    pub max_unauthenticated_per_source: usize,
}

impl Default for AgentLimits {
    fn default() -> Self {
        AgentLimits {
            max_unauthenticated: DEFAULT_MAX_UNAUTHENTICATED,
            max_unauthenticated_per_source: DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE,
        }
    }
}
