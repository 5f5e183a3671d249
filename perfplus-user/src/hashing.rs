//! Perf+ page hashing. (Skeleton; the hashing work fills it in.)
