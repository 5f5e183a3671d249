//! The kernel-wrapper module: every ioctl (and kernel-shared mapping) perfplus makes itself, because
//! `kvm-ioctls` lacks it or the `libc` crate and Debian 12's 6.1 headers are too old for it. The
//! rest of the crate calls the kernel through here or through `kvm-ioctls`, never with its own
//! `ioctl`.
//!
//! | interface | module | wrapper |
//! |---|---|---|
//! | `KVM_CLEAR_DIRTY_LOG` (VM fd) | [`kvm`] | [`kvm::clear_dirty_log`] |
//! | `KVM_RESET_DIRTY_RINGS` (VM fd) | [`kvm`] | [`kvm::reset_dirty_rings`] |
//! | dirty ring `mmap` (vCPU fd) | [`kvm`] | [`kvm::DirtyRingMap`] |
//! | `userfaultfd()`, `UFFDIO_API`, `UFFDIO_REGISTER` (MISSING, MINOR, WP), `UFFDIO_UNREGISTER` | [`userfaultfd`] | [`userfaultfd::Userfaultfd`] |
//! | `UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_CONTINUE`, `UFFDIO_WRITEPROTECT`, `UFFDIO_WAKE`, fault messages | [`userfaultfd`] | [`userfaultfd::Userfaultfd`] |
//! | `PAGEMAP_SCAN` (`/proc/self/pagemap`) | [`pagemap`] | [`pagemap::Pagemap`] |
//!
//! Users: `vm/ram.rs` (clear dirty log), `vm/vcpu_rings.rs` (ring mapping, reset), `demand_paging.rs`
//! (userfaultfd MISSING and MINOR modes), `tracking/uffd_wp.rs` (userfaultfd WP_ASYNC +
//! `PAGEMAP_SCAN`). All
//! other KVM ioctls (VM and vCPU creation, memory slots, `KVM_GET_DIRTY_LOG`, `KVM_ENABLE_CAP`,
//! register state, `KVM_RUN`) are `kvm-ioctls`' own.
//!
//! Style, after `kvm-ioctls`: one typed method (or function, on a foreign fd type) per ioctl,
//! returning `io::Result`; each `unsafe` block with a `// SAFETY:` note saying why the pointer and
//! size are right; a wrapper that lets the kernel change memory Rust could see (`UFFDIO_COPY`,
//! `UFFDIO_ZEROPAGE`, `UFFDIO_CONTINUE`) or that maps kernel memory of a size the kernel cannot be asked for (the dirty
//! ring) is an `unsafe fn` with a `# Safety` section. Structures the kernel defines but
//! `kvm-bindings`/`libc` lack are `#[repr(C)]` here, and each module's tests check their sizes,
//! offsets and ioctl numbers against the uapi headers, then make live calls on this kernel.
pub mod kvm;
pub mod pagemap;
pub mod userfaultfd;
