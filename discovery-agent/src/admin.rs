//! Operator commands that write the documented etcd layout, so nobody has
//! to hand-write keys or JSON: `service put|rm`, `backend disable|enable`.
use anyhow::{Context as _, bail};

use crate::{
    config::{BackendCommand, ServiceCommand},
    etcd::connect,
    schema::{
        FrontendJson, KeepaliveJson, ServiceJson, check_instance, check_name, maintenance_key_path,
        parse_addr, service_key_path,
    },
};

pub async fn service(cmd: ServiceCommand) -> anyhow::Result<()> {
    match cmd {
        ServiceCommand::Put {
            name,
            frontend,
            protocol,
            policy,
            connect_timeout,
            user_timeout,
            keepalive_idle,
            keepalive_interval,
            keepalive_probes,
            takeover,
            shutdown_sessions,
            etcd,
        } => {
            check_name(&name)?;
            let frontends = frontend
                .iter()
                .map(|f| {
                    parse_addr(f)
                        .map(|a| a.to_string())
                        .map_err(|e| anyhow::anyhow!("--frontend: {e}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let key = service_key_path(&etcd.prefix, &name);
            let json = ServiceJson {
                frontend: FrontendJson::new(frontends),
                protocol,
                policy,
                check: None,
                connect_timeout,
                user_timeout,
                keepalive: keepalive_idle.map(|idle| KeepaliveJson {
                    idle,
                    interval: keepalive_interval,
                    probes: keepalive_probes,
                }),
                takeover,
                shutdown_sessions,
            };
            // The agents would skip an invalid definition; say so here.
            json.tcp_opts()?;
            let value = serde_json::to_string(&json)?;
            let mut client = connect(&etcd.config()?).await?;
            client
                .put(key.as_str(), value.as_str(), None)
                .await
                .with_context(|| format!("writing {key}"))?;
            println!("{key} {value}");
        }
        ServiceCommand::Rm { name, etcd } => {
            let key = service_key_path(&etcd.prefix, &name);
            let mut client = connect(&etcd.config()?).await?;
            let r = client
                .delete(key.as_str(), None)
                .await
                .with_context(|| format!("deleting {key}"))?;
            if r.deleted() == 0 {
                bail!("service {name} is not defined ({key} does not exist)");
            }
            println!("deleted {key}");
        }
    }
    Ok(())
}

/// The maintenance override: stored in etcd so every node agrees, under its
/// own key so the instance's announcer cannot clear it.
pub async fn backend(cmd: BackendCommand) -> anyhow::Result<()> {
    let (service, instance, etcd, reason) = match &cmd {
        BackendCommand::Disable {
            service,
            instance,
            reason,
            etcd,
        } => (service, instance, etcd, Some(reason.clone())),
        BackendCommand::Enable {
            service,
            instance,
            etcd,
        } => (service, instance, etcd, None),
    };
    check_name(service)?;
    check_instance(instance)?;
    let key = maintenance_key_path(&etcd.prefix, service, instance);
    let mut client = connect(&etcd.config()?).await?;
    match reason {
        Some(reason) => {
            let value = serde_json::json!({ "reason": reason }).to_string();
            client
                .put(key.as_str(), value.as_str(), None)
                .await
                .with_context(|| format!("writing {key}"))?;
            println!("{service}/{instance} in maintenance: no new connections ({key})");
        }
        None => {
            let r = client
                .delete(key.as_str(), None)
                .await
                .with_context(|| format!("deleting {key}"))?;
            if r.deleted() == 0 {
                bail!("{service}/{instance} is not in maintenance ({key} does not exist)");
            }
            println!("{service}/{instance} back in rotation");
        }
    }
    Ok(())
}
