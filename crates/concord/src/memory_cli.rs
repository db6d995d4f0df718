//! The memory commands: `remember`, `recall`, `memory get|history|forget`,
//! `fork diff|promote` (DESIGN §5). Output shows provenance (who wrote it, from
//! which instance) and age, which is what a person deciding whether to trust a
//! recalled memory needs to see first.

use crate::cli::Conn;
use crate::output::{self, ago, opt, table};
use anyhow::{anyhow, Result};
use clap::Subcommand;
use concord_core::memory::{Memory, SearchRequest, WriteMemoryRequest};

fn e(err: concord_core::Error) -> anyhow::Error {
    anyhow!("{}: {}", err.code.as_str(), err.message)
}

fn who(m: &Memory) -> String {
    let p = &m.provenance;
    match (&p.entity, &p.instance) {
        (Some(e), Some(i)) => format!("{e}/{i}"),
        (Some(e), None) => e.clone(),
        (None, Some(i)) => i.clone(),
        (None, None) => "admin".into(),
    }
}

fn short(text: &str, n: usize) -> String {
    let one_line = text.replace('\n', " ");
    if one_line.chars().count() <= n {
        one_line
    } else {
        format!("{}…", one_line.chars().take(n).collect::<String>())
    }
}

fn print_memory(m: &Memory) {
    println!(
        "{} v{} in {} ({}, {})",
        m.id, m.version, m.space, m.kind, m.visibility
    );
    println!(
        "  by {} {} (seq {})",
        who(m),
        ago(m.created_at.millis()),
        m.seq
    );
    if !m.tags.is_empty() {
        println!("  tags: {}", m.tags.join(", "));
    }
    if let Some(from) = &m.provenance.promoted_from {
        println!("  promoted from {from}");
    }
    match (&m.invalid_at, &m.superseded_by) {
        (Some(_), Some(n)) => println!("  closed: superseded by {n}"),
        (Some(t), None) => println!("  closed {}", ago(t.millis())),
        _ => {}
    }
    if m.purged {
        println!("  purged");
    } else {
        println!("  {}", m.text);
    }
}

#[derive(Subcommand)]
pub enum MemoryCmd {
    /// A memory by id.
    Get {
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Every version of a memory, oldest first.
    History {
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Close a memory without successor (`--purge`, admin: erase its bytes).
    Forget {
        id: String,
        #[arg(long)]
        fence: Option<u64>,
        #[arg(long)]
        purge: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
pub enum ForkCmd {
    /// A fork's branch and what changed in canonical memory since it forked.
    Diff {
        fork: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Copy branch memories into the entity's canonical memory.
    Promote {
        fork: String,
        /// Memory ids of the fork's branch.
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long)]
        fence: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `concord remember SPACE TEXT`.
pub struct Remember {
    pub space: String,
    pub text: String,
    pub kind: Option<String>,
    pub tags: Vec<String>,
    pub visibility: Option<String>,
    pub fence: Option<u64>,
}

pub async fn remember(r: Remember, conn: &Conn) -> Result<()> {
    let c = conn.client()?;
    let mut req: WriteMemoryRequest = concord_client::memory(&r.space, &r.text);
    req.kind = r.kind;
    req.tags = r.tags;
    req.visibility = r.visibility;
    req.fence = r.fence;
    let w = c.remember(&req).await.map_err(e)?;
    if conn.json {
        return output::json(&w);
    }
    if w.deduplicated {
        println!("already known as {}", w.memory.id);
    } else {
        println!("remembered {} (seq {})", w.memory.id, w.memory.seq);
    }
    Ok(())
}

pub async fn recall(
    query: String,
    spaces: Vec<String>,
    trusted_only: bool,
    limit: usize,
    conn: &Conn,
) -> Result<()> {
    let c = conn.client()?;
    let req = SearchRequest {
        query,
        spaces,
        trusted_only,
        limit: Some(limit),
        ..Default::default()
    };
    let r = c.recall(&req).await.map_err(e)?;
    if conn.json {
        return output::json(&r);
    }
    let rows: Vec<Vec<String>> = r
        .results
        .iter()
        .map(|h| {
            vec![
                format!("{:.2}", h.score),
                h.memory.id.clone(),
                h.memory.space.clone(),
                who(&h.memory),
                ago(h.memory.created_at.millis()),
                short(&h.memory.text, 80),
            ]
        })
        .collect();
    table(&["SCORE", "ID", "SPACE", "BY", "AGE", "TEXT"], &rows);
    println!("({} results, {})", r.results.len(), r.mode);
    if let Some(n) = &r.note {
        println!("note: {n}");
    }
    Ok(())
}

pub async fn memory(cmd: MemoryCmd) -> Result<()> {
    match cmd {
        MemoryCmd::Get { id, conn } => {
            let m = conn.client()?.memory(&id, false).await.map_err(e)?;
            if conn.json {
                return output::json(&m);
            }
            print_memory(&m.memory);
        }
        MemoryCmd::History { id, conn } => {
            let m = conn.client()?.memory(&id, true).await.map_err(e)?;
            if conn.json {
                return output::json(&m);
            }
            for v in m.history.unwrap_or_default() {
                print_memory(&v);
            }
        }
        MemoryCmd::Forget {
            id,
            fence,
            purge,
            conn,
        } => {
            let m = conn.client()?.forget(&id, fence, purge).await.map_err(e)?;
            if conn.json {
                return output::json(&m);
            }
            println!(
                "{} {}",
                if purge { "purged" } else { "forgot" },
                m.memory.id
            );
        }
    }
    Ok(())
}

pub async fn fork(cmd: ForkCmd) -> Result<()> {
    match cmd {
        ForkCmd::Diff { fork, conn } => {
            let d = conn.client()?.fork_diff(&fork).await.map_err(e)?;
            if conn.json {
                return output::json(&d);
            }
            println!(
                "fork {} of {} at memory-log position {}",
                d.fork, d.entity, d.fork_point
            );
            let rows = |v: &[Memory]| -> Vec<Vec<String>> {
                v.iter()
                    .map(|m| {
                        vec![
                            m.id.clone(),
                            if m.invalid_at.is_some() {
                                "closed"
                            } else {
                                "open"
                            }
                            .into(),
                            who(m),
                            ago(m.created_at.millis()),
                            short(&m.text, 80),
                        ]
                    })
                    .collect()
            };
            println!("branch ({}):", d.branch.len());
            table(&["ID", "STATE", "BY", "AGE", "TEXT"], &rows(&d.branch));
            println!("canonical since the fork ({}):", d.canonical_since.len());
            table(
                &["ID", "STATE", "BY", "AGE", "TEXT"],
                &rows(&d.canonical_since),
            );
        }
        ForkCmd::Promote {
            fork,
            ids,
            fence,
            conn,
        } => {
            let p = conn.client()?.promote(&fork, ids, fence).await.map_err(e)?;
            if conn.json {
                return output::json(&p);
            }
            for w in p.promoted {
                println!(
                    "{} -> {} ({})",
                    opt(&w.memory.provenance.promoted_from),
                    w.memory.id,
                    if w.deduplicated {
                        "already canonical"
                    } else {
                        "promoted"
                    }
                );
            }
        }
    }
    Ok(())
}
