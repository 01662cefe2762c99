//! `discovery-agent map`: the fleet map (see `fleet`) to a file or stdout.
use anyhow::{Context as _, bail};

use crate::{
    config::{MapArgs, MapFormat},
    fleet,
};

pub async fn run(args: MapArgs) -> anyhow::Result<()> {
    let f = fleet::read(&args.etcd.config()?, &args.etcd.prefix)
        .await?
        .filter(args.service.as_deref(), args.node.as_deref())
        .collapse_above(args.collapse_above);
    if f.is_empty() {
        bail!(
            "nothing to draw under {} (no services{})",
            args.etcd.prefix,
            if args.service.is_some() || args.node.is_some() {
                " match the filter"
            } else {
                ""
            }
        );
    }
    let out = match args.format {
        MapFormat::Dot => fleet::dot(&f),
        MapFormat::Svg => fleet::svg(&f)?,
    };
    match &args.out {
        Some(path) => {
            std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
        }
        None => {
            print!("{out}");
            Ok(())
        }
    }
}
