//! Stopping, restarting and deleting instances ([`Depot::stop_instance`],
//! [`Depot::restart_instance`], [`Depot::delete_instance`]), each under the
//! instance's lock.

use std::time::Duration;

use tracing::instrument;

use crate::catalog::instances;
use crate::catalog::InstanceState;
use crate::depot::Depot;
use crate::error::{Error, IoContext, Result};
use crate::launch::instance::{Held, InstanceInfo};
use crate::launch::process::{stop_qemu, Stopped};

impl Depot {
    /// Stops an instance: ACPI power button through QMP, then kill after
    /// `timeout`; `force` kills at once. Stopping a stopped instance is not
    /// an error. A guest that did not power off within `timeout` (or whose
    /// QMP did not take the press) is killed, and the instance stopped:
    /// that is [`Error::PowerButtonIgnored`].
    #[instrument(skip_all, err(level = "debug"))]
    pub fn stop_instance(
        &self,
        reference: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<InstanceInfo> {
        let (info, how) = self.stop_quietly(reference, force, timeout)?;
        match how {
            Stopped::IgnoredButton | Stopped::NoQmp => Err(Error::PowerButtonIgnored {
                instance: format!("{} ({})", info.name, info.id),
                waited: (how == Stopped::IgnoredButton).then_some(timeout),
            }),
            Stopped::PoweredOff | Stopped::Forced => Ok(info),
        }
    }

    /// [`Depot::stop_instance`], a guest killed after the timeout
    /// included: for the callers that start or change it next.
    pub(crate) fn stop_quietly(
        &self,
        reference: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<(InstanceInfo, Stopped)> {
        let Held { r, p, .. } = &self.hold(reference)?;
        let mut how = Stopped::PoweredOff;
        if r.state == InstanceState::Running {
            if let Some(pid) = r.pid {
                how = stop_qemu(p, pid, &r.id, force, timeout);
            }
            instances::set_stopped(&self.repo.conn, &r.id, r.pid)?;
        }
        Ok((self.instance(&r.id)?, how))
    }

    /// Stops (see [`Depot::stop_instance`]; a guest that ignores the power
    /// button is killed) and starts an instance.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn restart_instance(
        &self,
        reference: &str,
        timeout: Duration,
    ) -> Result<(InstanceInfo, Option<String>)> {
        self.stop_quietly(reference, false, timeout)?;
        self.start_instance(reference)
    }

    /// Deletes an instance: its disk, seed, sockets, logs and row. A running
    /// instance needs `force` (it is killed).
    #[instrument(skip_all, err(level = "debug"))]
    pub fn delete_instance(&self, reference: &str, force: bool) -> Result<InstanceInfo> {
        let Held { r, p, .. } = &self.hold(reference)?;
        if r.state == InstanceState::Running {
            if !force {
                return Err(Error::Conflict(format!(
                    "instance {} ({}) is running: stop it first, or delete it with --force",
                    r.name, r.id
                )));
            }
            if let Some(pid) = r.pid {
                stop_qemu(p, pid, &r.id, true, Duration::ZERO);
            }
        }
        let info = self.info(r.clone(), None);
        instances::delete_instance(&self.repo.conn, &r.id)?;
        crate::repo::orphans::remove_instance_dir(&p.dir).at(&p.dir)?;
        Ok(info)
    }
}
