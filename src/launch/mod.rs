//! Running images: the QEMU command line, QMP and the accelerator probe
//! ([`qemu`]), the cloud-init seed ([`seed`]), and instances with their
//! launch bases ([`instance`]).

pub mod instance;
pub mod qemu;
pub mod seed;
