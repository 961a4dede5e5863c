//! d2l::dist with real processes on 127.0.0.1 (Gloo): 2 and 3 ranks reduce, broadcast and meet
//! at a barrier; a rank that dies, a wrong WORLD_SIZE and an unreachable master are clear errors
//! within the timeout instead of hangs; bad variables are named.
mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, ChildRun};
use d2l::dist::{ProcessGroup, ReduceOp};
use d2l::tch::Tensor;

/// A rank: this binary's `rank_process` test, with torchrun's variables.
fn rank(role: &str, port: u16, rank: usize, world: usize, timeout_s: u32) -> Child {
    common::rank_command(role, port, rank, world, timeout_s)
        .spawn()
        .unwrap()
}

/// Waits for a rank, killing it past `limit` (a hang is a failure, not a stall).
fn finish(mut child: Child, limit: Duration) -> ChildRun {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let run = common::wait_child(child);
            panic!("a rank hung past {limit:?}: {run:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    common::wait_child(child)
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t).unwrap()
}

/// The rank side, per D2L_TEST_ROLE; nothing in a normal run.
#[test]
fn rank_process() {
    let Ok(role) = std::env::var("D2L_TEST_ROLE") else {
        return;
    };
    if let Some(inner) = role.strip_prefix("launch:") {
        // A launcher: runs this binary's rank_process as 2 ranks of the role after the colon.
        std::env::set_var("D2L_TEST_ROLE", inner);
        let args: Vec<std::ffi::OsString> = [
            "--exact",
            "rank_process",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ]
        .iter()
        .map(Into::into)
        .collect();
        let code = d2l::dist::launch(2, &args).unwrap();
        println!("RESULT launched: {code:?}");
        return;
    }
    let result = (|| -> d2l::Result<String> {
        let group = ProcessGroup::from_env()?.expect("WORLD_SIZE is set");
        let r = group.rank() as f32;
        match role.as_str() {
            "collectives" => {
                let sum = Tensor::from_slice(&[r + 1.0, 10.0 * (r + 1.0)]);
                let avg = Tensor::from_slice(&[r]);
                let max = Tensor::from_slice(&[r * 7.0]);
                group.all_reduce(&[&sum, &avg], ReduceOp::Sum)?;
                group.all_reduce(&[&max], ReduceOp::Max)?;
                let mean = Tensor::from_slice(&[r]);
                group.all_reduce(&[&mean], ReduceOp::Avg)?;
                let from_last = Tensor::from_slice(&[r, r, r]);
                group.broadcast(&[&from_last], group.world_size() - 1)?;
                group.barrier()?;
                Ok(format!(
                    "{:?} {:?} {:?} {:?} {:?}",
                    values(&sum),
                    values(&avg),
                    values(&max),
                    values(&mean),
                    values(&from_last)
                ))
            }
            // Rank 1 leaves before the first collective; the others must not hang.
            "one_dies" => {
                if group.rank() == 1 {
                    std::process::exit(3);
                }
                let t = Tensor::from_slice(&[1.0f32]);
                group.all_reduce(&[&t], ReduceOp::Sum)?;
                Ok("all_reduce returned".into())
            }
            // Launched by d2l::dist::launch: rank 1 fails; rank 0 would wait long.
            "fail_one" => {
                if group.rank() == 1 {
                    std::process::exit(3);
                }
                std::thread::sleep(Duration::from_secs(120));
                Ok("not stopped".into())
            }
            other => panic!("unknown role {other}"),
        }
    })();
    common::report(result);
}

#[test]
fn two_and_three_ranks_reduce_broadcast_and_meet() {
    assert!(
        d2l::dist::is_available(),
        "d2l was built without d2l::dist: run python3 scripts/setup.py (it installs libgloo-dev)"
    );
    for world in [2usize, 3] {
        let port = free_port();
        let ranks: Vec<Child> = (0..world)
            .map(|r| rank("collectives", port, r, world, 30))
            .collect();
        let runs: Vec<ChildRun> = ranks
            .into_iter()
            .map(|c| finish(c, Duration::from_secs(120)))
            .collect();
        let w = world as f32;
        let sum = w * (w + 1.0) / 2.0;
        let want = format!(
            "{:?} {:?} {:?} {:?} {:?}",
            vec![sum, 10.0 * sum],
            vec![(0..world).map(|r| r as f32).sum::<f32>()],
            vec![(w - 1.0) * 7.0],
            vec![(w - 1.0) / 2.0],
            vec![w - 1.0; 3]
        );
        for run in &runs {
            assert_eq!(run.result(), Some(want.as_str()), "{world} ranks: {run:?}");
        }
    }
}

#[test]
fn a_rank_that_dies_is_an_error_for_the_others_not_a_hang() {
    let port = free_port();
    let ranks: Vec<Child> = (0..3).map(|r| rank("one_dies", port, r, 3, 10)).collect();
    let runs: Vec<ChildRun> = ranks
        .into_iter()
        .map(|c| finish(c, Duration::from_secs(90)))
        .collect();
    assert_eq!(runs[1].status.code(), Some(3));
    for run in [&runs[0], &runs[2]] {
        let error = run.error().unwrap_or_else(|| panic!("{run:?}"));
        assert!(
            error.starts_with("Distributed: all_reduce on rank")
                && error.contains("another rank may have stopped"),
            "{error}"
        );
    }
}

#[test]
fn a_wrong_world_size_and_an_unreachable_master_are_clear_errors() {
    // Two ranks started where WORLD_SIZE says three: the rendezvous waits for the third, then
    // both fail, saying what to check.
    let port = free_port();
    let ranks: Vec<Child> = (0..2).map(|r| rank("collectives", port, r, 3, 4)).collect();
    for run in ranks
        .into_iter()
        .map(|c| finish(c, Duration::from_secs(90)))
    {
        let error = run.error().unwrap_or_else(|| panic!("{run:?}"));
        assert!(
            error.starts_with("Distributed: init_process_group (rank")
                && error.contains("of 3")
                && error.contains("all WORLD_SIZE ranks started"),
            "{error}"
        );
    }
    // A rank whose master is not there.
    let run = finish(
        rank("collectives", free_port(), 1, 2, 3),
        Duration::from_secs(90),
    );
    let error = run.error().unwrap_or_else(|| panic!("{run:?}"));
    assert!(
        error.starts_with("Distributed: init_process_group (rank 1 of 2")
            && error.contains("is reachable from every rank"),
        "{error}"
    );
}

#[test]
fn bad_variables_are_named() {
    // Only this test sets these variables in this binary's own process.
    for (vars, named) in [
        (
            &[("WORLD_SIZE", "2"), ("RANK", "5")][..],
            "RANK must be below WORLD_SIZE",
        ),
        (&[("WORLD_SIZE", "two"), ("RANK", "0")][..], "WORLD_SIZE"),
        (
            &[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "http")][..],
            "MASTER_PORT",
        ),
        (&[("WORLD_SIZE", "2")][..], "RANK is not"),
    ] {
        for v in ["WORLD_SIZE", "RANK", "MASTER_PORT", "LOCAL_RANK"] {
            std::env::remove_var(v);
        }
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
        let err = d2l::dist::InitOptions::from_env().unwrap_err().to_string();
        assert!(err.contains(named), "{vars:?}: {err}");
    }
    for v in ["WORLD_SIZE", "RANK", "MASTER_PORT"] {
        std::env::remove_var(v);
    }
    assert_eq!(d2l::dist::InitOptions::from_env().unwrap(), None);
}

#[test]
fn launch_runs_the_ranks_and_stops_them_when_one_fails() {
    let launcher = |role: &str| {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "rank_process",
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            .env("D2L_TEST_ROLE", format!("launch:{role}"))
            .env("D2L_DIST_TIMEOUT", "30")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Both ranks run, with torchrun's variables, and reduce across each other.
    let run = finish(launcher("collectives"), Duration::from_secs(120));
    // The ranks share the launcher's stdout: another rank's test-harness dot may precede a
    // RESULT on its line.
    let results: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .collect();
    assert_eq!(results.len(), 3, "{run:?}");
    assert_eq!(results[2], "launched: ExitCode(unix_exit_status(0))");
    assert!(
        results[0].starts_with("[3.0, 30.0]") && results[0] == results[1],
        "{results:?}"
    );
    // Rank 1 exits with 3: the launcher stops rank 0 (which would sleep two minutes) and
    // reports 3.
    let run = finish(launcher("fail_one"), Duration::from_secs(60));
    assert!(
        run.stdout
            .contains("RESULT launched: ExitCode(unix_exit_status(3))")
            && !run.stdout.contains("not stopped"),
        "{run:?}"
    );
}
