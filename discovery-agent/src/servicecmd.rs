//! `discovery-agent service put|rm`: writes the documented service JSON so
//! nobody has to write it by hand.
use anyhow::{Context as _, bail};

use crate::{
    config::ServiceCommand,
    etcd::connect,
    model::{ServiceJson, parse_addr, service_key_path, valid_name},
};

pub async fn run(cmd: ServiceCommand) -> anyhow::Result<()> {
    match cmd {
        ServiceCommand::Put {
            name,
            frontend,
            protocol,
            etcd,
        } => {
            if !valid_name(&name) {
                bail!("invalid service name {name:?}: must match [a-z0-9][a-z0-9._-]{{0,62}}");
            }
            let frontend = parse_addr(&frontend).map_err(|e| anyhow::anyhow!("--frontend: {e}"))?;
            let key = service_key_path(&etcd.prefix, &name);
            let value = serde_json::to_string(&ServiceJson {
                frontend: frontend.to_string(),
                protocol,
            })?;
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
