//! The candidate registry: entries seen by other lock objects, updated, withdrawn, and gone at
//! once when their registrant's process is killed.

use std::io::BufRead as _;
use std::process::{Command, Stdio};

use super::*;
use crate::backend::Candidate;

fn sorted(mut entries: Vec<Candidate>) -> Vec<Candidate> {
    entries.sort_by(|a, b| a.node.cmp(&b.node));
    entries
}

/// Waits until `lock`'s registry reads `expected`, following its watch.
async fn registry_reads(lock: &DirLock, changes: &mut Box<dyn Changes>, expected: &[Candidate]) {
    let expected = sorted(expected.to_vec());
    within("the registry to read as expected", async {
        loop {
            if sorted(lock.candidates().await.unwrap()) == expected {
                return;
            }
            changes.changed().await.unwrap();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_are_added_updated_replaced_and_withdrawn_across_lock_objects() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (open(tmp.path(), "jobs"), open(tmp.path(), "jobs"));
    assert!(b.candidates().await.unwrap().is_empty());
    let mut changes = b.watch_candidates().await.unwrap();

    let web1 = Candidate::new("web/1").with_priority(3).with_ready(false);
    let first = a.register(web1.clone(), None).await.unwrap();
    // Visible to the other object as soon as register returned.
    assert_eq!(b.candidates().await.unwrap(), vec![web1.clone()]);
    within("the watch to report the entry", changes.changed())
        .await
        .unwrap();

    let web2 = Candidate::new("web-2").with_priority(5);
    let second = b.register(web2.clone(), None).await.unwrap();
    registry_reads(
        &a,
        &mut a.watch_candidates().await.unwrap(),
        &[web1.clone(), web2.clone()],
    )
    .await;

    // An update is seen at once, and reported.
    let ready = web1.clone().with_ready(true).with_draining(true);
    first.update(ready.clone()).await.unwrap();
    assert_eq!(
        sorted(b.candidates().await.unwrap()),
        sorted(vec![ready.clone(), web2.clone()])
    );
    registry_reads(&b, &mut changes, &[ready.clone(), web2.clone()]).await;

    // Registering a node again replaces its entry; dropping the replaced one changes nothing.
    let again = Candidate::new("web/1").with_priority(7);
    let replacement = b.register(again.clone(), None).await.unwrap();
    assert_eq!(
        sorted(a.candidates().await.unwrap()),
        sorted(vec![again.clone(), web2.clone()])
    );
    drop(first);
    assert_eq!(
        sorted(a.candidates().await.unwrap()),
        sorted(vec![again.clone(), web2.clone()])
    );

    // Withdrawn on drop, reported, and the file is gone.
    drop(second);
    registry_reads(&b, &mut changes, std::slice::from_ref(&again)).await;
    drop(replacement);
    registry_reads(&b, &mut changes, &[]).await;
    let left: Vec<_> = fs::read_dir(tmp.path().join("jobs.candidates"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A registrant in a child process (a shell holding the entry's `flock`) killed with SIGKILL:
/// its entry is no longer listed the moment the process is gone, the watch reports it, and the
/// first reader deletes the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_registrants_entry_is_gone_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let a = open(tmp.path(), "jobs");
    let mine = a.register(Candidate::new("me"), None).await.unwrap();
    let dir = tmp.path().join("jobs.candidates");

    // The child's entry: written by a registration of this process, then its file handed to
    // the child: the child locks a copy, and this process's registration is withdrawn.
    let entry = Candidate::new("child").with_priority(11);
    let staged = a.register(entry.clone(), None).await.unwrap();
    let staged_file = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("child.")
        })
        .unwrap();
    let bytes = fs::read(&staged_file).unwrap();
    drop(staged);
    let tmp_path = dir.join(".child.staged");
    let final_path = dir.join("child.99.0");
    fs::write(&tmp_path, &bytes).unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("exec 9<>\"$1\" && flock -x 9 && echo locked && exec sleep 60")
        .arg("sh")
        .arg(&tmp_path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked");
    fs::rename(&tmp_path, &final_path).unwrap();

    let mut changes = a.watch_candidates().await.unwrap();
    assert_eq!(
        sorted(a.candidates().await.unwrap()),
        sorted(vec![entry.clone(), Candidate::new("me")])
    );
    child.kill().unwrap();
    child.wait().unwrap();
    // Gone at once: no wait before this read.
    assert_eq!(a.candidates().await.unwrap(), vec![Candidate::new("me")]);
    assert!(!final_path.exists(), "the reader deletes the dead entry");
    // The death was reported (the child's write descriptor closed).
    within("the watch to report the death", changes.changed())
        .await
        .unwrap();
    drop(mine);
}

/// What is not a live entry of this user is not listed: a symbolic link, a directory, a dead
/// file (deleted), a live file that cannot be parsed; dot files are not looked at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_in_the_registry_is_not_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let a = open(tmp.path(), "jobs");
    let live = a.register(Candidate::new("real"), None).await.unwrap();
    let dir = tmp.path().join("jobs.candidates");
    let real = fs::read_dir(&dir).unwrap().flatten().next().unwrap().path();
    std::os::unix::fs::symlink(&real, dir.join("link.1.1")).unwrap();
    fs::create_dir(dir.join("subdir")).unwrap();
    fs::write(dir.join("dead.1.1"), b"whatever").unwrap();
    fs::write(dir.join(".hidden"), b"x").unwrap();
    let garbled = dir.join("garbled.1.1");
    fs::write(&garbled, b"tower-primary-candidate 1 0 5\n{}{}{").unwrap();
    let held = File::open(&garbled).unwrap();
    held.lock().unwrap();

    assert_eq!(a.candidates().await.unwrap(), vec![Candidate::new("real")]);
    assert!(!dir.join("dead.1.1").exists(), "a dead file is deleted");
    assert!(garbled.exists(), "a live file is never deleted");
    assert!(dir.join(".hidden").exists());
    drop(held);
    drop(live);
    assert!(a.candidates().await.unwrap().is_empty());
    assert!(!real.exists());

    // A symbolic link in place of the registry directory is refused.
    let other = tempfile::tempdir().unwrap();
    let b = open(other.path(), "jobs");
    std::os::unix::fs::symlink(tmp.path(), other.path().join("jobs.candidates")).unwrap();
    let err = b.register(Candidate::new("x"), None).await.unwrap_err();
    assert!(err.to_string().contains("candidate registry"), "{err}");
}
