//! Kernel interfaces that `kvm-ioctls` and the `userfaultfd` crate do not wrap, in their style: one
//! typed, safe method per ioctl, the `unsafe` call inside with its reasoning.
pub mod kvm;
pub mod pagemap;
pub mod userfaultfd;
