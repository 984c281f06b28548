//! The operator image as `make image` builds it (`hack/build-image.sh`, crane), checked from the
//! outside: a docker-archive tarball whose config names the entrypoint, a numeric non-root user
//! and the platform; one layer holding the binary, every library `ldd` lists and CA
//! certificates; the binary runs inside that layer alone (chroot, as the image's user); and the
//! same binary gives the same tarball twice.
//!
//! It packs the workspace's debug `cutover` binary (what `make test` builds) rather than the
//! release one `make image` uses: the layout and the tool are the same, and CI does not pay
//! for a release build. `make e2e-node` imports and runs the release image on a real node.

use std::path::Path;
use std::process::Command;

use cutover_e2e::operator::cutover_binary;
use cutover_e2e::tools::{repo_root, run};
use serde_json::Value;

const TAG: &str = "cutover-e2e.local/cutover:test";

fn build(binary: &Path, output: &Path) {
    run(Command::new("bash")
        .arg(repo_root().join("hack/build-image.sh"))
        .arg("--binary")
        .arg(binary)
        .arg("--output")
        .arg(output)
        .args(["--tag", TAG]))
    .unwrap_or_else(|e| panic!("{e}"));
}

fn untar(tar: &Path, into: &Path, gzip: bool) {
    std::fs::create_dir_all(into).unwrap();
    let mut cmd = Command::new("tar");
    cmd.arg(if gzip { "-xzf" } else { "-xf" })
        .arg(tar)
        .arg("-C")
        .arg(into);
    run(&mut cmd).unwrap_or_else(|e| panic!("{e}"));
}

fn sha256(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path)).unwrap();
    out.split_whitespace().next().unwrap().to_owned()
}

#[test]
fn make_image_packs_a_self_contained_non_root_image_reproducibly() {
    let binary = cutover_binary();
    let dir = tempfile::tempdir().unwrap();
    let tarball = dir.path().join("image.tar");
    build(&binary, &tarball);

    let archive = dir.path().join("archive");
    untar(&tarball, &archive, false);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(archive.join("manifest.json")).unwrap()).unwrap();
    let entry = &manifest[0];
    assert_eq!(entry["RepoTags"][0], TAG);
    let layers = entry["Layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "one layer: {manifest}");
    let config: Value = serde_json::from_slice(
        &std::fs::read(archive.join(entry["Config"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (&config["os"], &config["architecture"]),
        (&Value::from("linux"), &Value::from("amd64"))
    );
    let c = &config["config"];
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!(["/usr/local/bin/cutover"])
    );
    assert_eq!(
        c["User"], "65532:65532",
        "numeric, so runAsNonRoot can be checked"
    );
    assert!(c["Cmd"].is_null(), "arguments come from the pod: {c}");

    let rootfs = dir.path().join("rootfs");
    untar(&archive.join(layers[0].as_str().unwrap()), &rootfs, true);
    for file in [
        "usr/local/bin/cutover",
        "lib64/ld-linux-x86-64.so.2",
        "etc/ssl/certs/ca-certificates.crt",
        "etc/passwd",
    ] {
        assert!(rootfs.join(file).is_file(), "{file} in the layer");
    }
    // Every library the binary links, at the path ldd resolves it to.
    let ldd = run(Command::new("ldd").arg(&binary)).unwrap();
    for lib in ldd
        .lines()
        .filter_map(|l| l.split("=>").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|p| p.starts_with('/'))
    {
        assert!(
            rootfs.join(&lib[1..]).is_file(),
            "{lib} (from ldd) in the layer"
        );
    }
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains("cutover:x:65532:65532:"), "{passwd}");

    // The binary runs with nothing but the layer, as the image's user (needs root to chroot).
    if is_root() {
        let out = run(Command::new("chroot")
            .arg("--userspec=65532:65532")
            .arg(&rootfs)
            .args(["/usr/local/bin/cutover", "--version"]))
        .unwrap_or_else(|e| panic!("the binary does not run inside its layer: {e}"));
        assert!(out.starts_with("cutover "), "{out}");
    } else {
        eprintln!("not root: the chroot run of the image's binary is skipped");
    }

    // The same binary, the same image, byte for byte.
    let again = dir.path().join("again.tar");
    build(&binary, &again);
    assert_eq!(
        sha256(&tarball),
        sha256(&again),
        "the image build is reproducible"
    );
}

fn is_root() -> bool {
    run(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}
