use tests::{
    lab::skip_without_root,
    rig::{Rig, move_bulk_both_ways},
};

#[test]
fn probe() {
    if skip_without_root() {
        return;
    }
    for round in 0..15 {
        let rig = Rig::start("packet", 1);
        eprintln!("ROUND {round}");
        let lines = move_bulk_both_ways(&rig, 8, 8 << 20);
        eprintln!("{}", lines.join("\n"));
    }
}
