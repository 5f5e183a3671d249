//! Handshake and cluster key. (Skeleton; the protocol work fills it in.)

/// The secret every agent and CLI of a cluster holds.
#[derive(Clone)]
pub struct ClusterKey {
    pub bytes: Vec<u8>,
}
