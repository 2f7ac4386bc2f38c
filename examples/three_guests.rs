//! Boots three ephemeral guests of a disk image at once and waits for a
//! line on each one's serial console. The guests die with this program,
//! however it ends.
//!
//! ```sh
//! cargo run --release --example three_guests -- DISK [LINE]
//! # e.g. the test guest: DISK=$(bash fixtures/build-test-guest.sh), LINE="VMDEPOT-GUEST: ready"
//! ```
//!
//! The depot is `$VMDEPOT_DIR`, else `vmdepot-example` in the temp dir; the
//! disk is imported once, as image `example` (another disk's content under
//! that name is an error: delete the image first).

use std::time::Duration;

use vmdepot::{Depot, ImportOptions, LaunchOptions, NoProgress};

fn main() {
    if let Err(e) = run() {
        eprintln!("three_guests: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let disk = args.next().ok_or("usage: three_guests DISK [LINE]")?;
    let line = args.next().unwrap_or_else(|| "login:".into());
    let dir = std::env::var_os("VMDEPOT_DIR")
        .map_or_else(|| std::env::temp_dir().join("vmdepot-example"), Into::into);
    let depot = Depot::open(dir)?;
    depot.ensure_imported(&disk, &ImportOptions::new("example"), &NoProgress)?;
    let mut opts = LaunchOptions::new("example");
    opts.count = 3;
    opts.ephemeral = true;
    let vms = depot.launch(&opts, &NoProgress)?.instances;
    std::thread::scope(|s| {
        let waits: Vec<_> = vms
            .iter()
            .map(|vm| s.spawn(|| vm.wait_for_serial(&line, Duration::from_secs(120))))
            .collect();
        for (vm, wait) in vms.iter().zip(waits) {
            println!(
                "{}: {}",
                vm.name(),
                wait.join().expect("a waiter panicked")?
            );
        }
        Ok(())
    })
}
