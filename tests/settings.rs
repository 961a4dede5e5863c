//! Which settings run: the book's where the data and weights can be had, the offline stand-in
//! where not, `D2L_PROFILE` over both; and the stand-in answering the chapter's own calls. One
//! test in this binary: it sets environment variables.
mod common;

use common::{Reply, Server};
use d2l::Settings;

#[test]
fn the_settings_follow_what_can_be_had_and_d2l_profile_overrides_them() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("D2L_DATA_DIR", dir.path().join("data"));
    std::env::set_var("TORCH_HOME", dir.path().join("torch"));
    std::env::set_var("D2L_HOME", dir.path().join("home"));
    std::env::remove_var("D2L_PROFILE");
    let server = Server::start();
    server.route("hotdog.zip", Reply::Body(b"zip".to_vec()));
    server.route("resnet18-f37072fd.pth", Reply::Body(b"pth".to_vec()));

    // Both reachable (mirrors on loopback): the book's settings, with a warning on the CPU.
    std::env::set_var("D2L_DATA_URL", &server.base);
    std::env::set_var("D2L_WEIGHTS_URL", &server.base);
    let p = Settings::auto().unwrap();
    assert_eq!(p.profile, "book");
    assert_eq!(p.stand_in, None);
    // The book's values, as plain data.
    assert_eq!(
        (
            p.crop,
            p.resize,
            p.batch_size,
            p.num_epochs,
            p.lr,
            p.scratch_lr
        ),
        (224, 256, 128, 5, 5e-5, 5e-4)
    );
    assert_eq!(
        Settings {
            why: p.why.clone(),
            ..Settings::default()
        },
        p
    );
    let banner = p.to_string();
    assert!(
        banner.contains("PROFILE: BOOK") && banner.contains("hotdog.zip"),
        "{banner}"
    );
    if !d2l::try_gpu(0).is_cuda() {
        assert!(
            banner.contains("WARNING: the book's settings on the CPU"),
            "{banner}"
        );
    }

    // The weights missing: offline, and the banner says why and what the data and model are.
    std::env::set_var("D2L_WEIGHTS_URL", server.url("nothing-here/"));
    let p = Settings::auto().unwrap();
    assert_eq!(p.profile, "offline");
    assert!(p.stand_in.is_some());
    assert!(
        p.why.contains("the ImageNet weights cannot be fetched"),
        "{}",
        p.why
    );
    let banner = p.to_string();
    for text in [
        "PROFILE: OFFLINE",
        "GENERATED hotdog-like",
        "NOT on ImageNet",
        "not comparable with the book",
    ] {
        assert!(banner.contains(text), "{text:?} not in {banner}");
    }

    // Nothing answers at all (a closed port), as on a machine without network.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    std::env::set_var("D2L_DATA_URL", &dead);
    std::env::set_var("D2L_WEIGHTS_URL", &dead);
    let p = Settings::auto().unwrap();
    assert_eq!(p.profile, "offline");
    assert!(
        p.why
            .contains("neither hotdog.zip nor the ImageNet weights can be fetched"),
        "{}",
        p.why
    );

    // A server that takes the connection and never answers (a black hole, a stalled proxy): the
    // probes give up (their timeout) and the profile is offline, instead of waiting for ever.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}/", silent.local_addr().unwrap());
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in silent.incoming().flatten() {
            let _ = held_tx.send(conn); // kept open, never written to
        }
    });
    std::env::set_var("D2L_DATA_URL", &silent_url);
    std::env::set_var("D2L_WEIGHTS_URL", &silent_url);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || done_tx.send(Settings::auto().map(|p| (p.profile, p.why))));
    // A bound on the test, not a timing claim: without a timeout the probe would never return.
    let (name, why) = done_rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the profile probe waited for ever on a server that never answers")
        .unwrap();
    assert_eq!(name, "offline");
    assert!(
        why.contains("neither hotdog.zip nor the ImageNet weights can be fetched"),
        "{why}"
    );
    let held: Vec<_> = held_rx.try_iter().collect();
    assert_eq!(
        held.len(),
        2,
        "both probes reached the silent server and gave up"
    );

    // A cached hotdog.zip and cached weights count as had, without any network.
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/hotdog.zip"), b"zip").unwrap();
    let ckpt = dir.path().join("torch/hub/checkpoints");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::write(ckpt.join("resnet18-f37072fd.pth"), b"pth").unwrap();
    assert_eq!(Settings::auto().unwrap().profile, "book");

    // The override.
    std::env::set_var("D2L_PROFILE", "ci");
    let p = Settings::auto().unwrap();
    assert_eq!(p.profile, "ci");
    assert!(p.to_string().contains("PROFILE: CI (D2L_PROFILE=ci)"));
    assert_eq!(Settings::current(), Some(p));
    std::env::set_var("D2L_PROFILE", "fast");
    let err = Settings::auto().unwrap_err().to_string();
    assert!(
        err.contains("\"fast\"") && err.contains("book, offline or ci"),
        "{err}"
    );
    std::env::remove_var("D2L_PROFILE");

    // The stand-in answers the book's own call: download_extract("hotdog") is the generated
    // set, made once under D2L_HOME in the chapter's layout, not the cached hotdog.zip.
    let p = Settings::named("ci").unwrap();
    d2l::DATA_HUB.insert(
        "hotdog",
        format!("{}hotdog.zip", d2l::DATA_URL),
        "fba480ffa8aa7e0febbb511d181409f899b9baa5",
    );
    let data = d2l::download_extract("hotdog").unwrap();
    assert!(
        data.starts_with(dir.path().join("home")),
        "{}",
        data.display()
    );
    let train = d2l::ImageFolder::new(data.join("train")).unwrap();
    let test = d2l::ImageFolder::new(data.join("test")).unwrap();
    assert_eq!(train.classes(), ["hotdog", "not-hotdog"]);
    let generated = &p.stand_in.as_ref().unwrap().hotdog;
    assert_eq!(train.len(), 2 * generated.train_per_class);
    assert_eq!(test.len(), 2 * generated.test_per_class);
    assert_eq!(d2l::download_extract("hotdog").unwrap(), data);
    // Its hot-dog class in the source set, for the third exercise.
    let (class, name) = p.hotdog_class();
    assert_eq!(name, "hotdog");
    assert_eq!(class, 6); // apple, baguette, banana, burger, cookie, donut, hotdog, ...

    // The book's settings put the real data hub back: the cached hotdog.zip is checked (it is
    // not the real one) and fetched again from the mirror (a closed port), nothing generated.
    std::env::set_var("D2L_DATA_URL", &dead);
    std::env::set_var("D2L_PROFILE", "book");
    let book = Settings::auto().unwrap();
    assert_eq!(
        book.hotdog_class(),
        (934, "hotdog, hot dog, red hot".to_owned())
    );
    let err = d2l::download_extract("hotdog").unwrap_err().to_string();
    assert!(err.contains("hotdog.zip"), "{err}");
    std::env::remove_var("D2L_PROFILE");
}
