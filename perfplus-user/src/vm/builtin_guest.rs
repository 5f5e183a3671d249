//! The built-in workload guest. (Skeleton; the guest work fills it in.)
