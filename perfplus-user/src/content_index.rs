//! The destination's content index. (Skeleton; the hashing work fills it in.)
