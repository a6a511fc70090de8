//! systemd's manager over D-Bus: transient units started, stopped, listed
//! and read (`org.freedesktop.systemd1.Manager` and the units' properties).

use std::collections::HashMap;

use anyhow::Context;
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};

const DEST: &str = "org.freedesktop.systemd1";
const PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";

/// A connection to one systemd instance's manager.
#[derive(Clone)]
pub struct Systemd {
    conn: zbus::Connection,
}

/// What a unit reports of itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UnitState {
    /// `active`, `activating`, `deactivating`, `inactive`, `failed`.
    pub active: String,
    /// e.g. `running`, `exited`, `dead`, `auto-restart`.
    pub sub: String,
    /// How the main process ended: 1 exited, 2 killed, 3 dumped (0: not yet).
    pub exec_main_code: i32,
    /// Its exit status, or the signal that killed it.
    pub exec_main_status: i32,
    /// Restarts systemd made.
    pub restarts: u32,
    /// `success`, `exit-code`, `signal`, `oom-kill`, …
    pub result: String,
    /// When the main process started (µs since the epoch; 0: never).
    pub started_usec: u64,
    /// When it exited (µs since the epoch; 0: not yet).
    pub exited_usec: u64,
}

/// One property of a transient unit.
pub type Property = (&'static str, OwnedValue);

/// A property value, for [`Systemd::start`].
pub fn value<'a, T: Into<Value<'a>>>(v: T) -> OwnedValue {
    OwnedValue::try_from(v.into()).expect("a plain value has no file descriptors")
}

impl Systemd {
    /// Connects to the bus at `address` (e.g. `unix:path=/run/user/0/bus`),
    /// or to the system bus.
    pub async fn connect(address: Option<&str>) -> anyhow::Result<Self> {
        let conn = match address {
            Some(a) => zbus::connection::Builder::address(a)?
                .build()
                .await
                .with_context(|| format!("connecting to D-Bus at {a}"))?,
            None => zbus::Connection::system()
                .await
                .context("connecting to the system D-Bus")?,
        };
        Ok(Systemd { conn })
    }

    async fn manager<B>(&self, method: &str, body: &B) -> zbus::Result<zbus::Message>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        self.conn
            .call_method(Some(DEST), PATH, Some(MANAGER), method, body)
            .await
    }

    /// Starts transient unit `name` with `properties` (mode `fail`: an
    /// existing unit of that name is an error, never replaced).
    pub async fn start(&self, name: &str, properties: Vec<Property>) -> anyhow::Result<()> {
        let aux: Vec<(&str, Vec<(&str, OwnedValue)>)> = Vec::new();
        self.manager("StartTransientUnit", &(name, "fail", properties, aux))
            .await
            .with_context(|| format!("starting unit {name}"))?;
        Ok(())
    }

    /// Stops unit `name` (systemd sends its `KillSignal`, then SIGKILL after
    /// its `TimeoutStopUSec`); a unit that is not loaded is already stopped.
    pub async fn stop(&self, name: &str) -> anyhow::Result<()> {
        match self.manager("StopUnit", &(name, "replace")).await {
            Ok(_) => Ok(()),
            Err(zbus::Error::MethodError(e, _, _)) if e.as_str().ends_with("NoSuchUnit") => Ok(()),
            Err(e) => Err(e).with_context(|| format!("stopping unit {name}")),
        }
    }

    /// systemd's version (the manager's `Version` property).
    pub async fn version(&self) -> anyhow::Result<String> {
        let r = self
            .conn
            .call_method(
                Some(DEST),
                PATH,
                Some("org.freedesktop.DBus.Properties"),
                "Get",
                &(MANAGER, "Version"),
            )
            .await?;
        let v: OwnedValue = r.body().deserialize()?;
        Ok(String::try_from(v)?)
    }

    /// Restarts unit `name` (a failed liveness probe).
    pub async fn restart(&self, name: &str) -> anyhow::Result<()> {
        self.manager("RestartUnit", &(name, "replace"))
            .await
            .with_context(|| format!("restarting unit {name}"))?;
        Ok(())
    }

    /// Forgets a failed or exited unit, so its name can be used again.
    pub async fn reset(&self, name: &str) {
        let _ = self.manager("ResetFailedUnit", &(name,)).await;
    }

    /// Names of the loaded units matching `pattern` (a glob).
    pub async fn list(&self, pattern: &str) -> anyhow::Result<Vec<String>> {
        let states: Vec<&str> = Vec::new();
        let reply = self
            .manager("ListUnitsByPatterns", &(states, vec![pattern]))
            .await
            .context("listing units")?;
        type Row = (
            String,
            String,
            String,
            String,
            String,
            String,
            OwnedObjectPath,
            u32,
            String,
            OwnedObjectPath,
        );
        let rows: Vec<Row> = reply.body().deserialize()?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// The state of unit `name`; `None` if it is not loaded.
    pub async fn state(&self, name: &str) -> anyhow::Result<Option<UnitState>> {
        let path: OwnedObjectPath = match self.manager("GetUnit", &(name,)).await {
            Ok(r) => r.body().deserialize()?,
            Err(zbus::Error::MethodError(e, _, _)) if e.as_str().ends_with("NoSuchUnit") => {
                return Ok(None);
            }
            Err(e) => return Err(e).with_context(|| format!("finding unit {name}")),
        };
        let all = |iface: &'static str| {
            let path = path.clone();
            async move {
                let r = self
                    .conn
                    .call_method(
                        Some(DEST),
                        path.as_str(),
                        Some("org.freedesktop.DBus.Properties"),
                        "GetAll",
                        &(iface,),
                    )
                    .await?;
                r.body().deserialize::<HashMap<String, OwnedValue>>()
            }
        };
        let unit = all("org.freedesktop.systemd1.Unit").await?;
        let service = all("org.freedesktop.systemd1.Service").await?;
        let s = |m: &HashMap<String, OwnedValue>, k: &str| {
            m.get(k)
                .and_then(|v| String::try_from(v.clone()).ok())
                .unwrap_or_default()
        };
        let i = |k: &str| {
            service
                .get(k)
                .and_then(|v| i32::try_from(v).ok())
                .unwrap_or(0)
        };
        let t = |k: &str| {
            service
                .get(k)
                .and_then(|v| u64::try_from(v).ok())
                .unwrap_or(0)
        };
        Ok(Some(UnitState {
            active: s(&unit, "ActiveState"),
            sub: s(&unit, "SubState"),
            exec_main_code: i("ExecMainCode"),
            exec_main_status: i("ExecMainStatus"),
            restarts: service
                .get("NRestarts")
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0),
            result: s(&service, "Result"),
            started_usec: t("ExecMainStartTimestamp"),
            exited_usec: t("ExecMainExitTimestamp"),
        }))
    }
}
