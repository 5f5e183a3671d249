//! The KVM dirty-log tracker (bitmap with manual clear). (Skeleton; the VMM work fills it in.)
