//! The `vmdepot` command line: one file per command group.

pub mod instance;
