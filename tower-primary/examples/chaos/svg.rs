//! The timeline picture: which node was primary when, and where the faults hit.
//!
//! plotters with its SVG backend only: text goes into the SVG as `<text>` elements for the viewer
//! to render, so no font is read or needed here.

use std::collections::HashMap;
use std::path::Path;

use plotters::prelude::*;

use crate::nemesis::FaultKind;
use crate::report::{Analysis, RunData};

const ROW_HEIGHT: u32 = 34;
const LEGEND_WIDTH: u32 = 230;

fn fault_color(kind: FaultKind) -> RGBColor {
    match kind {
        FaultKind::Kill => RGBColor(0, 0, 0),
        FaultKind::Term => RGBColor(0, 130, 60),
        FaultKind::Stop => RGBColor(120, 120, 120),
        FaultKind::Cut => RGBColor(230, 130, 0),
        FaultKind::Restart => RGBColor(200, 0, 0),
        FaultKind::Drop => RGBColor(160, 60, 0),
        FaultKind::KillConns => RGBColor(0, 150, 150),
        FaultKind::Flush => RGBColor(220, 0, 120),
        FaultKind::LeaseChange => RGBColor(120, 0, 0),
        FaultKind::StopWaiter => RGBColor(60, 60, 160),
        FaultKind::WorkerKill => RGBColor(90, 0, 140),
        FaultKind::HostKill => RGBColor(150, 0, 60),
        FaultKind::StopCandidate => RGBColor(0, 90, 160),
        FaultKind::Deploy => RGBColor(0, 180, 0),
        FaultKind::Drain => RGBColor(180, 160, 0),
    }
}

/// Period colours, one per node slot: none of them is a fault's colour.
fn slot_color(slot: usize) -> RGBColor {
    const COLORS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
        RGBColor(50, 50, 140),
        RGBColor(100, 120, 160),
    ];
    COLORS[slot % COLORS.len()]
}

const REJECTED: RGBColor = RGBColor(0, 0, 0);

/// Draws the timeline of a run into `path`.
pub(crate) fn draw(
    path: &Path,
    title: &str,
    data: &RunData,
    analysis: &Analysis,
    slots: usize,
    slot_of_pid: &HashMap<String, usize>,
) -> Result<(), String> {
    let rows = slots + 1; // the nodes, then the server
    let width = 1600;
    let height = 110 + ROW_HEIGHT * u32::try_from(rows).unwrap_or(u32::MAX);
    let root = SVGBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(width - LEGEND_WIDTH);

    let t = |ns: u64| ns.saturating_sub(data.origin) as f64 / 1e9;
    let t_max = t(data.end).max(1.0);
    // Node 1 on top: row r is drawn at y = rows - 1 - r; the server row at y = 0.
    let y_of_slot = |slot: usize| (rows - 1 - slot) as f64;
    let label = move |y: &f64| {
        if (y - y.round()).abs() > 1e-6 || *y < -0.1 {
            return String::new();
        }
        let y = y.round() as usize;
        if y == 0 {
            "server".to_owned()
        } else if y < rows {
            format!("node {}", rows - y)
        } else {
            String::new()
        }
    };
    let mut chart = ChartBuilder::on(&left)
        .caption(title, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(38)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..t_max, -0.5f64..(rows as f64 - 0.5))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows + 1)
        .y_label_formatter(&label)
        .x_desc("seconds since the first node started")
        .draw()
        .map_err(|e| e.to_string())?;

    let row_of = |node: &str| slot_of_pid.get(node).map(|s| y_of_slot(*s));

    // Stops and stalls first, as grey bands under the periods.
    let holds = data.faults.iter().filter_map(|f| {
        let y = y_of_slot(f.slot?);
        (f.until > f.at
            && matches!(
                f.kind,
                FaultKind::Stop | FaultKind::StopCandidate | FaultKind::Cut | FaultKind::Drop
            ))
        .then(|| {
            Rectangle::new(
                [(t(f.at), y - 0.42), (t(f.until), y + 0.42)],
                fault_color(f.kind).mix(0.18).filled(),
            )
        })
    });
    chart.draw_series(holds).map_err(|e| e.to_string())?;
    let downs = data
        .faults
        .iter()
        .filter(|f| f.kind == FaultKind::Restart)
        .map(|f| {
            Rectangle::new(
                [(t(f.at), -0.4), (t(f.until), 0.4)],
                fault_color(f.kind).mix(0.5).filled(),
            )
        });
    chart.draw_series(downs).map_err(|e| e.to_string())?;

    // The primary periods, coloured by slot, to their effective end (or the run's end).
    let periods = analysis.history.periods().iter().filter_map(|p| {
        let y = row_of(&p.node)?;
        let end = p.effective_end().unwrap_or(data.end);
        let color = slot_color(slot_of_pid.get(&p.node).copied().unwrap_or(0));
        Some(Rectangle::new(
            [(t(p.start), y - 0.28), (t(end), y + 0.28)],
            color.mix(0.85).filled(),
        ))
    });
    chart.draw_series(periods).map_err(|e| e.to_string())?;

    // Overlaps: red frames on both rows.
    let overlaps = analysis.report.history.overlaps.iter().flat_map(|o| {
        let from = o.second.start;
        let to = o
            .first
            .effective_end()
            .unwrap_or(data.end)
            .min(o.second.effective_end().unwrap_or(data.end));
        [&o.first.node, &o.second.node]
            .into_iter()
            .filter_map(|n| row_of(n))
            .map(move |y| {
                Rectangle::new(
                    [(t(from), y - 0.45), (t(to.max(from)), y + 0.45)],
                    RED.stroke_width(3),
                )
            })
            .collect::<Vec<_>>()
    });
    chart.draw_series(overlaps).map_err(|e| e.to_string())?;

    // Rejected (stale) writes: small dots above the row; unsafe writes: big red dots.
    let rejected = data
        .records
        .iter()
        .filter(|r| !r.verdict.is_accepted())
        .take(5000)
        .filter_map(|r| {
            let y = row_of(&r.node)?;
            Some(Circle::new(
                (t(r.checked_at), y + 0.36),
                2,
                REJECTED.filled(),
            ))
        });
    chart.draw_series(rejected).map_err(|e| e.to_string())?;
    let unsafe_writes = analysis
        .report
        .stale_accepted
        .iter()
        .chain(&analysis.report.unsafe_rejected)
        .filter_map(|r| {
            let y = row_of(&r.node)?;
            Some(Circle::new((t(r.checked_at), y), 6, RED.filled()))
        });
    chart
        .draw_series(unsafe_writes)
        .map_err(|e| e.to_string())?;

    // Fault markers at the moment they hit: a cross for a kill, a triangle for a term, a bar for
    // the others.
    let kills = data
        .faults
        .iter()
        .filter(|f| matches!(f.kind, FaultKind::Kill | FaultKind::WorkerKill))
        .filter_map(|f| {
            let y = y_of_slot(f.slot?);
            Some(Cross::new(
                (t(f.at), y),
                6,
                fault_color(f.kind).stroke_width(2),
            ))
        });
    chart.draw_series(kills).map_err(|e| e.to_string())?;
    let terms = data
        .faults
        .iter()
        .filter(|f| f.kind == FaultKind::Term)
        .filter_map(|f| {
            let y = y_of_slot(f.slot?);
            Some(TriangleMarker::new(
                (t(f.at), y),
                7,
                fault_color(f.kind).filled(),
            ))
        });
    chart.draw_series(terms).map_err(|e| e.to_string())?;
    let ticks = data
        .faults
        .iter()
        .filter(|f| {
            !matches!(
                f.kind,
                FaultKind::Kill | FaultKind::WorkerKill | FaultKind::Term
            )
        })
        .map(|f| {
            let y = f.slot.map_or(0.0, y_of_slot);
            let x = t(f.at);
            PathElement::new(
                vec![(x, y - 0.45), (x, y + 0.45)],
                fault_color(f.kind).stroke_width(3),
            )
        });
    chart.draw_series(ticks).map_err(|e| e.to_string())?;

    // The legend, on the right.
    let mut entries: Vec<(RGBAColor, &str)> = vec![
        (slot_color(0).mix(0.85), "primary period (colour per node)"),
        (RED.mix(1.0), "overlap (framed), unsafe write"),
        (REJECTED.mix(1.0), "stale write rejected (dot)"),
    ];
    // Only the kinds this run injected: the legend must fit beside the rows.
    for kind in FaultKind::ALL
        .into_iter()
        .filter(|k| data.faults.iter().any(|f| f.kind == *k))
    {
        let text = match kind {
            FaultKind::Kill => "kill: SIGKILL, replaced (x)",
            FaultKind::Term => "term: SIGTERM, replaced",
            FaultKind::Stop => "stop: SIGSTOP .. SIGCONT",
            FaultKind::Cut => "cut or stall via the proxy",
            FaultKind::Restart => "server restart",
            FaultKind::Drop => "drop: server side closed",
            FaultKind::KillConns => "kill-conns: sessions ended",
            FaultKind::Flush => "flush: FLUSHALL",
            FaultKind::LeaseChange => "lease-change: restart, mixed leases",
            FaultKind::StopWaiter => "stop-waiter: waiter stopped, kill",
            FaultKind::WorkerKill => "worker-kill: candidate SIGKILL (x)",
            FaultKind::HostKill => "host-kill: every process of a host",
            FaultKind::StopCandidate => "stop-candidate: SIGSTOP .. SIGCONT",
            FaultKind::Deploy => "deploy: drain, SIGTERM, higher priority",
            FaultKind::Drain => "drain: drain, SIGKILL, replaced",
        };
        entries.push((fault_color(kind).mix(0.7), text));
    }
    for (i, (color, text)) in entries.into_iter().enumerate() {
        let y = 40 + 22 * i32::try_from(i).unwrap_or(0);
        right
            .draw(&Rectangle::new([(10, y - 6), (28, y + 6)], color.filled()))
            .map_err(|e| e.to_string())?;
        right
            .draw(&Text::new(
                text.to_owned(),
                (34, y - 7),
                ("sans-serif", 13).into_font(),
            ))
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
