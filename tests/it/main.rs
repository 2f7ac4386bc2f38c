//! Integration tests: the real `vmdepot` binary on a real depot in a temp
//! dir, real qemu-img, real Debian disk images and a real QEMU guest built
//! by fixtures/. One test binary; one module per area.

mod build;
mod cli;
mod common;
mod exit_codes;
mod garage;
mod guard;
mod guest_access;
mod harness;
mod image;
mod instance;
mod layers;
mod lazy;
mod lifecycle;
mod readme;
mod reliability_bases;
mod reliability_disk;
mod reliability_pause;
mod reliability_powercut;
mod reliability_repair;
mod remote;
mod remote_s3;
mod security_access;
mod security_input;
mod security_local;
mod security_store;
