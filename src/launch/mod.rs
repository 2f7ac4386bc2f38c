//! Running images: the QEMU command line ([`qemu`]), the QMP client
//! ([`qmp`]), the accelerator choice and KVM probe ([`accel`]), the
//! cloud-init seed ([`seed`]), and instances: their public
//! types and true state ([`instance`]), the file layout of one (`paths`),
//! QEMU processes (`process`), launching (`create`), starting (`start`),
//! stopping and deleting (`control`), the pause lease of a live capture
//! (`pause`), systemd units ([`unit`](mod@unit)) and the harness's handle (`handle`).
//! Launch bases are image content: they live in `image::bases`.

pub mod accel;
pub(crate) mod control;
pub(crate) mod create;
pub mod disk;
pub mod firmware;
pub(crate) mod handle;
pub mod instance;
pub(crate) mod names;
pub(crate) mod owned;
pub(crate) mod paths;
pub(crate) mod pause;
pub(crate) mod process;
pub mod qemu;
pub mod qmp;
pub mod seed;
pub mod ssh;
pub(crate) mod start;
pub mod unit;
