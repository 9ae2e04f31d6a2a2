//! Fetches the Swagger UI and ReDoc bundles from the npm registry at build time (`npm pack`, no
//! dependency install) so `/docs` and `/redoc` work offline: the binary embeds every asset they load.
//! Set `SDHOST_WEB_ASSETS` to a folder that already holds the files to skip npm.

use std::path::{Path, PathBuf};
use std::process::Command;

const PACKAGES: &[(&str, &[&str])] = &[
    (
        "swagger-ui-dist@5.35.0",
        &["package/swagger-ui-bundle.js", "package/swagger-ui.css"],
    ),
    ("redoc@2.5.0", &["package/bundles/redoc.standalone.js"]),
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SDHOST_WEB_ASSETS");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR set by cargo"));
    let dest = out.join("web");
    std::fs::create_dir_all(&dest).expect("create OUT_DIR/web");

    if let Ok(dir) = std::env::var("SDHOST_WEB_ASSETS") {
        for (_, files) in PACKAGES {
            for f in *files {
                let name = Path::new(f).file_name().expect("file name");
                std::fs::copy(Path::new(&dir).join(name), dest.join(name))
                    .unwrap_or_else(|e| panic!("copy {name:?} from SDHOST_WEB_ASSETS: {e}"));
            }
        }
    } else {
        for (pkg, files) in PACKAGES {
            if files
                .iter()
                .all(|f| dest.join(Path::new(f).file_name().expect("name")).exists())
            {
                continue;
            }
            let status = Command::new("npm")
                .args(["pack", "--silent", pkg])
                .current_dir(&dest)
                .status()
                .unwrap_or_else(|e| {
                    panic!("running `npm pack {pkg}` (npm is needed to build the docs assets): {e}")
                });
            assert!(status.success(), "`npm pack {pkg}` failed");
            let tgz = format!("{}.tgz", pkg.replace('@', "-"));
            let status = Command::new("tar")
                .arg("xzf")
                .arg(&tgz)
                .args(files.iter())
                .current_dir(&dest)
                .status()
                .expect("tar");
            assert!(status.success(), "extracting {tgz} failed");
            for f in *files {
                let name = Path::new(f).file_name().expect("name");
                std::fs::rename(dest.join(f), dest.join(name)).expect("move asset");
            }
            let _ = std::fs::remove_file(dest.join(&tgz));
        }
    }
    println!("cargo:rustc-env=SDHOST_WEB_DIR={}", dest.display());
    let rev = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let profile = std::env::var("PROFILE").unwrap_or_default();
    println!("cargo:rustc-env=SDHOST_BUILD={rev} ({profile})");
}
