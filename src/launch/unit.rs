//! systemd units for instances ([`Depot::instance_unit`]): the unit text,
//! and the quoting of systemd.syntax(7) its values need ([`systemd_word`]
//! for `ExecStart=` words, [`systemd_text`] for settings and comments).

use tracing::instrument;

use crate::depot::Depot;
use crate::error::{Error, Result};
use crate::launch::instance::STOP_TIMEOUT;
use crate::launch::paths::path_str;

impl Depot {
    /// A systemd unit that runs the instance in the foreground
    /// (`Type=notify`: ready once QEMU is up; stop = ACPI power button).
    /// Every word of `ExecStart=` is quoted and every value escaped per
    /// systemd.syntax(7).
    #[instrument(skip_all, err(level = "debug"))]
    pub fn instance_unit(&self, reference: &str) -> Result<String> {
        let r = self.row(reference)?;
        let exe = std::env::current_exe().unwrap_or_else(|_| "vmdepot".into());
        let exe = path_str(&exe)?;
        let root = path_str(self.root())?;
        let exec = [
            exe,
            "--depot",
            root,
            "--account",
            &r.owner,
            "instance",
            "start",
            &r.id,
            "--foreground",
        ]
        .iter()
        .map(|w| systemd_word(w))
        .collect::<Result<Vec<_>>>()?
        .join(" ");
        Ok(format!(
            "# vmdepot instance {name}, image {image_name} ({image})\n\
             [Unit]\n\
             Description=vmdepot instance {name} ({id})\n\
             After=network.target\n\
             \n\
             [Service]\n\
             Type=notify\n\
             NotifyAccess=main\n\
             ExecStart={exec}\n\
             # SIGTERM presses the ACPI power button; QEMU is killed {stop_secs} s later.\n\
             KillMode=mixed\n\
             TimeoutStopSec={unit_stop}\n\
             Restart=on-failure\n\
             \n\
             [Install]\n\
             WantedBy=multi-user.target\n",
            name = systemd_text(&r.name)?,
            id = systemd_text(&r.id)?,
            image = systemd_text(&r.image)?,
            image_name = systemd_text(&r.image_name)?,
            stop_secs = STOP_TIMEOUT.as_secs(),
            unit_stop = STOP_TIMEOUT.as_secs() + 15,
        ))
    }
}

/// Refuses what no systemd unit line can hold.
fn systemd_refuse(s: &str) -> Result<()> {
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(Error::Invalid(format!(
            "{s:?} has the control character {c:?}, which a systemd unit cannot hold: \
             rename it (or move the depot) to use `instance unit`"
        )));
    }
    Ok(())
}

/// One word of an `ExecStart=` command line, per systemd.syntax(7) and
/// systemd.service(5): in double quotes, with `\` and `"` escaped by a
/// backslash, `%` (specifiers) as `%%` and `$` (variables) as `$$`. Control
/// characters (newlines: a new directive) are refused.
pub fn systemd_word(s: &str) -> Result<String> {
    systemd_refuse(s)?;
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '%' => o.push_str("%%"),
            '$' => o.push_str("$$"),
            c => o.push(c),
        }
    }
    o.push('"');
    Ok(o)
}

/// Text in a unit setting (`Description=`) or comment: `%` as `%%`,
/// control characters refused.
pub fn systemd_text(s: &str) -> Result<String> {
    systemd_refuse(s)?;
    Ok(s.replace('%', "%%"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_quoting() {
        assert_eq!(
            systemd_word("/usr/bin/vmdepot").unwrap(),
            "\"/usr/bin/vmdepot\""
        );
        assert_eq!(
            systemd_word(r#"/d ep%n$HOME\"x"#).unwrap(),
            r#""/d ep%%n$$HOME\\\"x""#
        );
        assert_eq!(systemd_text("50% off").unwrap(), "50%% off");
        for bad in ["m\nExecStartPre=/bin/touch /x", "a\rb", "\x1b[31m", "a\0"] {
            assert!(systemd_word(bad).is_err(), "{bad:?}");
            assert!(systemd_text(bad).is_err(), "{bad:?}");
        }
    }
}
