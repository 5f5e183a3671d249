//! Frames. (Skeleton; the protocol work fills it in.)

/// A batch of page items, encoded in place.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageBatch {
    pub bytes: Vec<u8>,
}
