//! Replays the fuzz targets' kept inputs on stable, without cargo-fuzz: every
//! file in tests/fuzz/regressions/<target>/ runs through the same check as
//! the target (`prism_data_plane::fuzz`), so a crash once found and fixed
//! stays fixed. `cargo xtask fuzz` adds a crash's input there.

use std::path::Path;

use prism_data_plane::fuzz::TARGETS;

#[test]
fn kept_fuzz_inputs_pass_their_targets() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/regressions");
    let mut replayed = 0;
    for (target, check) in TARGETS {
        let dir = root.join(target);
        // git keeps no empty folder: a target with no kept input has none.
        if !dir.exists() {
            continue;
        }
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.extension().is_some_and(|e| e == "md") {
                continue;
            }
            let data = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            eprintln!("replaying {}", path.display());
            check(&data);
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no kept inputs under {}", root.display());
}

/// The routes target is only worth its time if its generated policies pass
/// validation and its requests find routes: a good share of random inputs
/// must get that far (237 of these 500 do), or the fuzzer spends its time on
/// the first name check.
#[test]
fn generated_policies_reach_the_matcher() {
    // xorshift64: any fixed sequence of bytes will do.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut reached = 0;
    for _ in 0..500 {
        let data: Vec<u8> = (0..512)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[0]
            })
            .collect();
        reached += usize::from(prism_data_plane::fuzz::routes_reached(&data) > 0);
    }
    assert!(reached >= 200, "only {reached} of 500 inputs found a route");
}
