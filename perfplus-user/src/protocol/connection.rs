//! Connections. (Skeleton; the protocol work fills it in.)
