//! Compiles `ebpf/programs` for `bpfel-unknown-none` with aya-build and embeds the object.
//!
//! The eBPF compiler is a separate toolchain (a pinned nightly with rust-src, or Debian's
//! rustc-web) named by `CAUSEWAY_EBPF_TOOLCHAIN`; `scripts/install-deps.sh` installs it and
//! bpf-linker and writes the variables that `scripts/env.sh` exports. Without them the build
//! fails and says so: there is no gateway without its datapath.
use anyhow::{Context as _, anyhow, bail};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=CAUSEWAY_EBPF_TOOLCHAIN");
    let Ok(toolchain) = std::env::var("CAUSEWAY_EBPF_TOOLCHAIN") else {
        bail!(
            "CAUSEWAY_EBPF_TOOLCHAIN is not set, so the eBPF programs cannot be built.\n\
             Run `scripts/install-deps.sh` (installs the pinned nightly + rust-src and bpf-linker), \
             then `source scripts/env.sh` and build again. See docs/development.md."
        );
    };
    if which_bpf_linker().is_none() {
        bail!("bpf-linker is not in PATH: run scripts/install-deps.sh, then `source scripts/env.sh`");
    }
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let pkg = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "causeway-datapath-ebpf")
        .ok_or_else(|| anyhow!("causeway-datapath-ebpf is not in the workspace"))?;
    let root = pkg.manifest_path.parent().ok_or_else(|| anyhow!("{} has no parent", pkg.manifest_path))?;
    let package =
        aya_build::Package { name: pkg.name.as_str(), root_dir: root.as_str(), ..Default::default() };
    let toolchain = Toolchain::Custom(Box::leak(toolchain.into_boxed_str()));
    aya_build::build_ebpf([package], toolchain)
}

fn which_bpf_linker() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join("bpf-linker")).find(|p| p.is_file()))
}
