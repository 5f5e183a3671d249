//! The on-disk page store. (Skeleton; the hashing work fills it in.)
