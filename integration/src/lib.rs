//! Test harness for corodev's end-to-end tests: start a vhost-user-blk server on an image
//! ([`Daemon`]), boot a real Linux guest under QEMU against its socket ([`Vm`], through
//! `scripts/run-vm.sh`) that runs one test through the kernel's virtio_blk driver, and parse
//! the `CORODEV-*` lines it prints on the serial console ([`GuestRun`], [`GuestLine`]).
//! [`Image`] makes the disk image and reads it back, so a test can check on the host what
//! the guest wrote.
//!
//! [`frontend`] is a second, protocol-level client: it speaks vhost-user itself with
//! hand-built rings, for the hostile-guest and hostile-frontend tests.
//!
//! Boundary: this crate only drives processes (the corodev binary, qemu-storage-daemon,
//! QEMU) and files; it links none of corodev's code (only `corodev-testkit`'s wire-format
//! builders, which corodev's own device tests share). The guest side (what each test does
//! inside the VM and what it prints) lives in `scripts/guest-init.sh`, the QEMU command
//! line in `scripts/run-vm.sh`, the guest image in `scripts/build-guest.sh`.
//!
//! The server under test is corodev unless `CORODEV_TEST_SERVER=qsd` selects QEMU's own
//! qemu-storage-daemon ([`Server::from_env`]): running the same tests against the reference
//! implementation tells a corodev bug from a test bug.
//!
//! Nothing here is skipped silently: a missing QEMU, kernel or daemon binary is a test
//! failure with a message saying how to get it. Guests are serialised (one at a time):
//! under TCG on a 2-core machine two guests would only make each other time out.
//!
//! Modules, one concern each: [`workspace`](mod@workspace) (where things are),
//! [`server`] (which server, where its binary is), [`image`] (the disk image), [`daemon`]
//! (starting and watching a server), `procfs` (what /proc says about it), [`throttle`]
//! (limiting a server's disk writes), [`vm`] (booting a guest), [`console`] (what the guest
//! printed), [`frontend`] (the protocol-level client), [`qmp`] (talking to QEMU),
//! [`migration`] (moving a guest between QEMUs), [`systemd`](mod@systemd) (the notify and
//! activation sockets systemd would hold), [`ceph`] (a throw-away Ceph cluster for the RBD
//! backend), [`libvirt`] (the same guest booted through a private libvirtd), [`nvme`] (a
//! guest that is itself an NVMe host behind an IOMMU, for the NVMe-over-VFIO backend).

#![deny(
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks,
    clippy::missing_safety_doc
)]
#![warn(missing_docs)]

pub mod ceph;
pub mod console;
pub mod control;
pub mod daemon;
pub mod frontend;
pub mod image;
pub mod libvirt;
pub mod migration;
pub mod nvme;
mod procfs;
pub mod qmp;
pub mod server;
pub mod systemd;
pub mod throttle;
pub mod vm;
pub mod workload;
pub mod workspace;

pub use ceph::CephCluster;
pub use console::{parse_results, GuestLine, GuestRun, LineKind};
pub use daemon::{Daemon, Resources};
pub use image::{Image, TEST_IMAGE_SIZE};
pub use libvirt::{Domain, Libvirtd};
pub use migration::{Fleet, MigrationInfo, Progress, Side};
pub use qmp::{Qmp, QmpError};
pub use server::{corodev_bin, Server};
pub use throttle::WriteThrottle;
pub use vm::{guest_artifacts, Guest, GuestArtifacts, GuestSlot, Vm, VmControl};
pub use workspace::workspace;
