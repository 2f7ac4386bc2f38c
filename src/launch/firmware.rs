//! The guest's firmware: [`Firmware`] (what `--firmware` asks for),
//! [`choose_firmware`] (what an instance of an image boots with, from the
//! image's `firmware` tag), and the UEFI files: OVMF's code from Debian's
//! `ovmf` package, read-only, and a per-instance copy of its variable
//! store (`efivars.fd`, the boot entries the guest writes).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::perms::Perms;

/// The image tag naming the firmware an image boots with: `bios`, `uefi`
/// or both (`bios,uefi`), as `image build` records it.
pub const FIRMWARE_TAG: &str = "firmware";

/// OVMF's code (Debian 12's `ovmf`: 4 MiB flash, no Secure Boot).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// The empty variable store each UEFI instance gets a copy of.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// That copy's name in the instance's directory.
pub const VARS_FILE: &str = crate::repo::orphans::EFIVARS_FILE;

/// The firmware a guest boots with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// What the image's `firmware` tag says it boots with (BIOS first);
    /// BIOS for an image without the tag.
    Auto,
    /// SeaBIOS (QEMU's default): the image's MBR boot code.
    Bios,
    /// OVMF (UEFI): the EFI system partition's boot loader.
    Uefi,
}

impl Firmware {
    /// `auto`, `bios` or `uefi` (`--firmware`, and the catalog's text).
    pub fn parse(s: &str) -> Result<Firmware> {
        match s {
            "auto" => Ok(Firmware::Auto),
            "bios" => Ok(Firmware::Bios),
            "uefi" => Ok(Firmware::Uefi),
            _ => Err(Error::Usage(format!(
                "unknown firmware {s:?}: use auto, bios or uefi"
            ))),
        }
    }

    /// The text `parse` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Firmware::Auto => "auto",
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        }
    }
}

/// The firmware an instance of `image` boots with, for `requested` and
/// the image's `firmware` tag (`None`: untagged, nothing is known, any
/// choice is taken and `auto` is BIOS). A choice the tag excludes is a
/// usage error naming the image and what it boots with.
pub fn choose_firmware(requested: Firmware, image: &str, tag: Option<&str>) -> Result<Firmware> {
    let Some(tag) = tag else {
        return Ok(match requested {
            Firmware::Auto => Firmware::Bios,
            f => f,
        });
    };
    let has = |f: Firmware| tag.split(',').any(|t| t.trim() == f.as_str());
    let boots: Vec<Firmware> = [Firmware::Bios, Firmware::Uefi]
        .into_iter()
        .filter(|f| has(*f))
        .collect();
    match requested {
        Firmware::Auto => boots.first().copied().ok_or_else(|| {
            Error::Usage(format!(
                "image {image} has the {FIRMWARE_TAG} tag {tag:?}, which names neither \
                 bios nor uefi: pass --firmware bios or uefi (or fix the tag with \
                 image update --tag {FIRMWARE_TAG}=bios,uefi)"
            ))
        }),
        f if boots.contains(&f) => Ok(f),
        f => Err(Error::Usage(format!(
            "image {image} boots with {tag} only (its {FIRMWARE_TAG} tag), not {}: \
             use --firmware auto",
            f.as_str()
        ))),
    }
}

/// Makes sure OVMF is installed (before a UEFI instance is made or
/// started): an error naming the missing file and the package otherwise.
pub fn check_ovmf() -> Result<()> {
    for f in [OVMF_CODE, OVMF_VARS] {
        if !Path::new(f).is_file() {
            return Err(Error::Tool {
                tool: "ovmf".into(),
                detail: format!(
                    "{f} is missing: --firmware uefi needs Debian's OVMF \
                     (apt install ovmf), or use --firmware bios"
                ),
            });
        }
    }
    Ok(())
}

/// Gives a UEFI instance its variable store at `vars` (a copy of
/// [`OVMF_VARS`], the depot's file mode) unless it has one: the boot
/// entries its guest writes stay its own, across restarts.
pub(crate) fn ensure_vars(vars: &Path, perms: Perms) -> Result<()> {
    // QEMU opens the store read-write and follows links: only a regular
    // file of the instance's own is handed to it.
    match std::fs::symlink_metadata(vars) {
        Ok(m) if m.file_type().is_file() => return Ok(()),
        Ok(_) => {
            return Err(Error::StoreDamaged(format!(
                "{} is not a regular file: remove it (the instance gets a new, \
                 empty UEFI variable store at its next start)",
                vars.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).at(vars),
    }
    check_ovmf()?;
    let body = std::fs::read(OVMF_VARS).at(Path::new(OVMF_VARS))?;
    perms
        .replace_file(vars, &vars.with_extension("fd.tmp"), &body)
        .at(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_decides_auto_and_refuses_what_it_excludes() {
        use Firmware::*;
        assert_eq!(choose_firmware(Auto, "i", None).unwrap(), Bios);
        assert_eq!(choose_firmware(Uefi, "i", None).unwrap(), Uefi);
        assert_eq!(choose_firmware(Auto, "i", Some("bios,uefi")).unwrap(), Bios);
        assert_eq!(choose_firmware(Uefi, "i", Some("bios,uefi")).unwrap(), Uefi);
        assert_eq!(choose_firmware(Auto, "i", Some("uefi")).unwrap(), Uefi);
        let e = choose_firmware(Bios, "web", Some("uefi")).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string().contains("image web boots with uefi only"),
            "{e}"
        );
        let e = choose_firmware(Auto, "web", Some("coreboot")).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("--firmware bios or uefi"), "{e}");
        for f in [Auto, Bios, Uefi] {
            assert_eq!(Firmware::parse(f.as_str()).unwrap(), f);
        }
        assert_eq!(Firmware::parse("efi").unwrap_err().exit_code(), 2);
    }
}
