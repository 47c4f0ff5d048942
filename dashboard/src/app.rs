//! The dashboard's page: rendered on the server, hydrated in the browser,
//! then kept current by the snapshots the server pushes on `/live`.
//!
//! Rows are keyed by instance id and read their fields through memos, so a
//! new snapshot changes text in place: buttons keep their focus and a
//! confirmation stays open while the numbers move.

use crate::model::{
    short_duration, ClusterView, EventRow, InstanceState, InstanceView, Series, SessionsView,
    TestRun, TranscriptLine,
};
use leptos::prelude::*;

/// The document around the app (server side only).
pub fn shell(options: LeptosOptions) -> impl IntoView {
    #[cfg(feature = "ssr")]
    crate::ssr::content_security_policy();
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8"/>
                <meta name="viewport" content="width=device-width, initial-scale=1"/>
                <title>"confab dashboard"</title>
                <link rel="icon" href="data:,"/>
                <link rel="stylesheet" href="/pkg/dashboard.css"/>
                <HydrationScripts options/>
            </head>
            <body>
                <App/>
            </body>
        </html>
    }
}

/// The snapshot the page starts from; `/live` sends the next ones.
#[server(endpoint = "cluster")]
pub async fn cluster_snapshot() -> Result<ClusterView, ServerFnError> {
    let backend = crate::ssr::backend()?;
    Ok((*backend.watch().borrow()).as_ref().clone())
}

/// Drain (disable) or enable one instance.
#[server(endpoint = "instance-enabled")]
pub async fn set_instance_enabled(instance: String, enabled: bool) -> Result<(), ServerFnError> {
    let backend = crate::ssr::backend()?;
    backend
        .set_enabled(&instance, enabled)
        .await
        .map_err(ServerFnError::new)
}

/// Start a restoration test with `chats` chats (1 to 1,000); it runs in
/// the background and shows in the snapshots.
#[server(endpoint = "restoration-test")]
pub async fn run_restoration_test(chats: u32) -> Result<u64, ServerFnError> {
    let backend = crate::ssr::backend()?;
    backend
        .run_restoration_test(chats)
        .await
        .map_err(ServerFnError::new)
}

/// Restart every instance in turn through the `confab up` supervisor.
#[server(endpoint = "rolling-restart")]
pub async fn rolling_restart(drain_limit_s: u32) -> Result<(), ServerFnError> {
    let backend = crate::ssr::backend()?;
    backend
        .rolling_restart(drain_limit_s)
        .await
        .map_err(ServerFnError::new)
}

/// A page of an instance's live chats.
#[server(endpoint = "sessions")]
pub async fn instance_sessions(
    instance: String,
    after: String,
) -> Result<SessionsView, ServerFnError> {
    let backend = crate::ssr::backend()?;
    backend
        .sessions(&instance, &after)
        .await
        .map_err(ServerFnError::new)
}

/// A chat's whole transcript, from the instance hosting it.
#[server(endpoint = "transcript")]
pub async fn chat_transcript(
    instance: String,
    chat: String,
) -> Result<Vec<TranscriptLine>, ServerFnError> {
    let backend = crate::ssr::backend()?;
    backend
        .transcript(&instance, &chat)
        .await
        .map_err(ServerFnError::new)
}

/// A change an operator asked for and has yet to confirm.
#[derive(Clone, Debug, PartialEq)]
struct Pending {
    instance: String,
    enable: bool,
}

#[component]
pub fn App() -> impl IntoView {
    let initial = Resource::new(|| (), |_| cluster_snapshot());
    let live = RwSignal::new(None::<ClusterView>);
    let connected = RwSignal::new(true);
    let cluster = Signal::derive(move || live.get().or_else(|| initial.get().and_then(Result::ok)));
    let have_view = Memo::new(move |_| cluster.with(Option::is_some));
    #[cfg(feature = "hydrate")]
    Effect::new(move |_| {
        crate::live::follow(live, connected);
        if let Some(body) = document().body() {
            let _ = body.set_attribute("data-hydrated", "1");
        }
    });
    view! {
        <header class="top">
            <h1>"confab"</h1>
            <span class="sub">"operator dashboard"</span>
            <span class="spacer"></span>
            <span class="link-state" class:bad=move || !connected.get()>
                {move || if connected.get() { "live" } else { "reconnecting…" }}
            </span>
            <form method="post" action="/signout">
                <button type="submit" class="quiet">"Sign out"</button>
            </form>
        </header>
        <main>
            <Suspense fallback=|| view! { <p class="loading">"Loading the cluster…"</p> }>
                // Depends only on whether there is a view: a new snapshot
                // must update the page in place, not build it again.
                {move || {
                    if have_view.get() {
                        return view! { <Cluster cluster/> }.into_any();
                    }
                    match initial.get() {
                        Some(Err(e)) => view! {
                            <p class="error" role="alert">"The cluster view is unavailable: " {e.to_string()}</p>
                        }.into_any(),
                        _ => view! { <p class="loading">"Loading the cluster…"</p> }.into_any(),
                    }
                }}
            </Suspense>
        </main>
    }
}

#[component]
fn Cluster(cluster: Signal<Option<ClusterView>>) -> impl IntoView {
    let ids = Memo::new(move |_| {
        cluster.with(|c| {
            c.as_ref()
                .map(|c| c.instances.iter().map(|i| i.id.clone()).collect::<Vec<_>>())
                .unwrap_or_default()
        })
    });
    let pending = RwSignal::new(None::<Pending>);
    let selected = RwSignal::new(None::<String>);
    let toggle = ServerAction::<SetInstanceEnabled>::new();
    let field = move |f: fn(&ClusterView) -> String| {
        move || cluster.with(|c| c.as_ref().map(f).unwrap_or_default())
    };
    view! {
        <section class="summary" aria-label="cluster">
            <div class="card">
                <span class="label">"Chats active"</span>
                <span class="value" id="chats-active">{field(|c| c.chats_active.to_string())}</span>
            </div>
            <div class="card">
                <span class="label">"Waiting for an agent"</span>
                <span class="value" id="chats-waiting">{field(|c| c.chats_waiting.to_string())}</span>
            </div>
            <div class="card">
                <span class="label">"Messages/s"</span>
                <span class="value" id="messages-rate">{field(|c| format!("{:.1}", c.messages_per_s))}</span>
            </div>
            <div class="card">
                <span class="label">"Instances up"</span>
                <span class="value" id="instances-up">
                    {field(|c| format!("{} of {}", c.instances.iter().filter(|i| i.up).count(), c.instances.len()))}
                </span>
            </div>
            <div class="card">
                <span class="label">"Gateway failovers"</span>
                <span class="value" id="failovers">
                    {field(gateway_summary)}
                </span>
            </div>
        </section>
        <Confirm pending toggle/>
        {move || toggle.value().get().and_then(Result::err).map(|e| view! {
            <p class="error" role="alert">{e.to_string()}</p>
        })}
        <section aria-label="instances">
            <h2>"Instances"</h2>
            <div class="table-wrap">
                <table class="instances">
                    <thead>
                        <tr>
                            <th>"Instance"</th>
                            <th>"State"</th>
                            <th class="num">"Chats"</th>
                            <th class="num">"Msgs/s"</th>
                            <th class="num">"Save p99"</th>
                            <th>"Session store"</th>
                            <th>"Version"</th>
                            <th class="num">"Uptime"</th>
                            <th>"Action"</th>
                        </tr>
                    </thead>
                    <tbody>
                        <For
                            each=move || ids.get()
                            key=|id| id.clone()
                            children=move |id| view! { <InstanceRow id cluster pending selected/> }
                        />
                    </tbody>
                </table>
            </div>
        </section>
        <Sessions selected/>
        <RestorationTest cluster/>
        <RollingRestart cluster/>
        <Events cluster/>
        <section class="charts" aria-label="history">
            <Chart cluster title="Messages/s, last 10 minutes" pick=|s| s.messages_per_s.clone()/>
            <Chart cluster title="Chats per instance, last 10 minutes"
                pick=|s| s.sessions.iter().map(|&n| n as f64).collect()/>
        </section>
    }
}

fn gateway_summary(c: &ClusterView) -> String {
    if c.gateways.is_empty() {
        return "no gateway".into();
    }
    let failovers: u64 = c.gateways.iter().map(|g| g.failovers).sum();
    let down = c.gateways.iter().filter(|g| !g.up).count();
    if down > 0 {
        format!("{failovers} ({down} gateway down)")
    } else {
        failovers.to_string()
    }
}

#[component]
fn InstanceRow(
    id: String,
    cluster: Signal<Option<ClusterView>>,
    pending: RwSignal<Option<Pending>>,
    selected: RwSignal<Option<String>>,
) -> impl IntoView {
    let key = id.clone();
    let row = Memo::new(move |_| {
        cluster.with(|c| {
            c.as_ref()
                .and_then(|c| c.instances.iter().find(|i| i.id == key).cloned())
                .unwrap_or_default()
        })
    });
    let text = move |f: fn(&InstanceView) -> String| move || row.with(f);
    let state = move || row.with(InstanceView::state);
    let ask = {
        let id = id.clone();
        move |_| {
            let enable = !row.with(|r| r.enabled);
            pending.set(Some(Pending {
                instance: id.clone(),
                enable,
            }))
        }
    };
    view! {
        <tr data-instance=id.clone() class:down=move || state() == InstanceState::Down>
            <td>
                <button
                    class="id link"
                    title="Show its chats"
                    on:click={
                        let id = id.clone();
                        move |_| selected.set(Some(id.clone()))
                    }
                >
                    {id.clone()}
                </button>
                <span class="url">{text(|r| r.url.clone())}</span>
            </td>
            <td>
                <span class=move || format!("state {}", state().class())>{move || state().label()}</span>
                {move || row.with(|r| r.error.clone()).map(|e| view! { <span class="why">{e}</span> })}
            </td>
            <td class="num sessions">{text(|r| if r.up { r.sessions_active.to_string() } else { "—".into() })}</td>
            <td class="num">{text(|r| if r.up { format!("{:.1}", r.messages_per_s) } else { "—".into() })}</td>
            <td class="num">{text(|r| r.save_p99_ms.map(|ms| format!("{ms:.1} ms")).unwrap_or_else(|| "—".into()))}</td>
            <td>
                {move || row.with(store_cell)}
            </td>
            <td>{text(|r| r.version.clone())}</td>
            <td class="num">{text(|r| if r.up { short_duration(r.uptime_s) } else { "—".into() })}</td>
            <td>
                <button
                    class="action"
                    disabled=move || state() == InstanceState::Down
                    on:click=ask
                >
                    {move || if row.with(|r| r.enabled) { "Drain" } else { "Enable" }}
                </button>
            </td>
        </tr>
    }
}

fn store_cell(r: &InstanceView) -> impl IntoView {
    if !r.up {
        return view! { <span class="muted">"—"</span> }.into_any();
    }
    let (label, class) = if r.store_available {
        ("available", "state good")
    } else {
        ("UNAVAILABLE", "state bad")
    };
    let since = r
        .store_changed_at_ms
        .map(|ms| format!("since {}", clock(ms)));
    view! {
        <span class="backend">{r.store_backend.clone()}</span>
        " "
        <span class=class>{label}</span>
        {since.map(|s| view! { <span class="why">{s}</span> })}
    }
    .into_any()
}

/// `HH:MM:SS` UTC of a Unix-millisecond time.
fn clock(ms: u64) -> String {
    let s = (ms / 1000) % 86400;
    format!("{:02}:{:02}:{:02} UTC", s / 3600, (s % 3600) / 60, s % 60)
}

#[component]
fn Confirm(
    pending: RwSignal<Option<Pending>>,
    toggle: ServerAction<SetInstanceEnabled>,
) -> impl IntoView {
    move || {
        pending.get().map(|p| {
            let (verb, what) = if p.enable {
                ("Enable", "It takes new chats again.")
            } else {
                (
                    "Drain",
                    "It takes no new chats; its chats go on until they end. When it shows 0 chats it is safe to stop.",
                )
            };
            let go = {
                let p = p.clone();
                move |_| {
                    toggle.dispatch(SetInstanceEnabled {
                        instance: p.instance.clone(),
                        enabled: p.enable,
                    });
                    pending.set(None);
                }
            };
            view! {
                <div class="confirm" role="dialog" aria-label="confirm">
                    <p><strong>{format!("{verb} {}?", p.instance)}</strong> " " {what}</p>
                    <button class="primary" id="confirm" on:click=go>{format!("{verb} {}", p.instance)}</button>
                    <button class="quiet" on:click=move |_| pending.set(None)>"Cancel"</button>
                </div>
            }
        })
    }
}

/// A line per instance, drawn as SVG from the snapshot's history.
#[component]
fn Chart(
    cluster: Signal<Option<ClusterView>>,
    title: &'static str,
    pick: fn(&Series) -> Vec<f64>,
) -> impl IntoView {
    const W: f64 = 600.0;
    const H: f64 = 140.0;
    let lines = move || {
        cluster.with(|c| {
            let Some(c) = c else { return Vec::new() };
            let series: Vec<(String, Vec<f64>)> = c
                .history
                .iter()
                .map(|s| (s.instance.clone(), pick(s)))
                .collect();
            let max = series
                .iter()
                .flat_map(|(_, v)| v.iter().copied())
                .fold(1.0_f64, f64::max);
            let len = series.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
            series
                .into_iter()
                .enumerate()
                .map(|(n, (id, values))| {
                    let step = W / (len.max(2) - 1) as f64;
                    let offset = len - values.len();
                    let points = values
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            format!(
                                "{:.1},{:.1}",
                                (offset + i) as f64 * step,
                                H - v / max * (H - 10.0)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" ");
                    (id, points, n % 6, max)
                })
                .collect::<Vec<_>>()
        })
    };
    view! {
        <figure class="chart">
            <figcaption>{title}</figcaption>
            <svg viewBox=format!("0 0 {W} {H}") preserveAspectRatio="none" role="img" aria-label=title>
                {move || lines().into_iter().map(|(_, points, n, _)| view! {
                    <polyline class=format!("line c{n}") points=points fill="none"/>
                }).collect_view()}
            </svg>
            <div class="legend">
                {move || {
                    let lines = lines();
                    let max = lines.first().map(|l| l.3).unwrap_or(0.0);
                    view! {
                        {lines.into_iter().map(|(id, _, n, _)| view! {
                            <span class=format!("key c{n}")>{id}</span>
                        }).collect_view()}
                        <span class="muted">{format!("top: {max:.0}")}</span>
                    }
                }}
            </div>
        </figure>
    }
}

#[component]
fn RestorationTest(cluster: Signal<Option<ClusterView>>) -> impl IntoView {
    let chats = RwSignal::new(1u32);
    let run = ServerAction::<RunRestorationTest>::new();
    let blocked =
        Memo::new(move |_| cluster.with(|c| c.as_ref().and_then(|c| c.test_blocked.clone())));
    let running =
        Memo::new(move |_| cluster.with(|c| c.as_ref().is_some_and(|c| c.test_running.is_some())));
    // The run to show: the one running, else the latest.
    let shown = Memo::new(move |_| {
        cluster.with(|c| {
            c.as_ref().and_then(|c| {
                c.test_running
                    .clone()
                    .or_else(|| c.test_history.first().cloned())
            })
        })
    });
    let history = Memo::new(move |_| {
        cluster.with(|c| {
            c.as_ref()
                .map(|c| c.test_history.clone())
                .unwrap_or_default()
        })
    });
    let start = move |_| {
        run.dispatch(RunRestorationTest {
            chats: chats.get_untracked(),
        });
    };
    view! {
        <section class="panel" aria-label="restoration test">
            <h2>"Restoration test"</h2>
            <p class="muted">
                "Starts chats through the gateway as a customer and an agent, kills the instance \
                 carrying them with SIGKILL, and checks that every chat goes on with its whole \
                 transcript: every acknowledged message exactly once, the disconnected and \
                 reconnected notices present."
            </p>
            <div class="controls">
                <label for="test-chats">"Chats"</label>
                <input
                    id="test-chats"
                    type="number"
                    min="1"
                    max="1000"
                    prop:value=move || chats.get().to_string()
                    on:input=move |ev| {
                        if let Ok(n) = event_target_value(&ev).parse::<u32>() {
                            chats.set(n.clamp(1, 1000));
                        }
                    }
                />
                <button
                    class="primary"
                    id="run-test"
                    disabled=move || blocked.get().is_some() || running.get()
                    on:click=start
                >
                    "Run restoration test"
                </button>
                {move || blocked.get().map(|why| view! { <span class="why" id="test-blocked">{why}</span> })}
            </div>
            {move || run.value().get().and_then(Result::err).map(|e| view! {
                <p class="error" role="alert">{e.to_string()}</p>
            })}
            {move || shown.get().map(|r| view! { <RunView run=r name="test"/> })}
            {move || {
                let history = history.get();
                (!history.is_empty()).then(|| view! {
                    <h3>"History"</h3>
                    <div class="table-wrap">
                        <table class="history">
                            <thead>
                                <tr>
                                    <th>"Started"</th>
                                    <th class="num">"Chats"</th>
                                    <th>"Instance killed"</th>
                                    <th class="num">"Resumed (p50 / p99 / max)"</th>
                                    <th>"Verdict"</th>
                                </tr>
                            </thead>
                            <tbody>
                                {history.into_iter().map(|r| view! {
                                    <tr data-test=r.id>
                                        <td>{clock(r.started_ms)}</td>
                                        <td class="num">{r.chats}</td>
                                        <td>{r.instance_killed.clone().unwrap_or_else(|| "—".into())}</td>
                                        <td class="num">{r.resume.as_ref().map(|t| format!("{} / {} / {} ms", t.p50_ms, t.p99_ms, t.max_ms)).unwrap_or_else(|| "—".into())}</td>
                                        <td><span class=verdict_class(&r)>{r.verdict_label()}</span></td>
                                    </tr>
                                }).collect_view()}
                            </tbody>
                        </table>
                    </div>
                })
            }}
        </section>
    }
}

fn verdict_class(r: &TestRun) -> &'static str {
    match &r.verdict {
        None => "state warn",
        Some(v) if v.passed => "state good",
        Some(_) => "state bad",
    }
}

/// One run: its verdict and its steps with their timings.
#[component]
fn RunView(run: TestRun, name: &'static str) -> impl IntoView {
    let class = verdict_class(&run);
    let label = run.verdict_label();
    let reason = run.verdict.as_ref().map(|v| v.reason.clone());
    view! {
        <div class="run" id=format!("{name}-run") data-verdict=label>
            <p class="verdict">
                <span class=class id=format!("{name}-verdict")>{label}</span>
                " "
                {reason.unwrap_or_else(|| match run.chats {
                    0 => format!("started {}", clock(run.started_ms)),
                    n => format!("{n} chat(s), started {}", clock(run.started_ms)),
                })}
            </p>
            <ol class="steps">
                {run.steps.into_iter().map(|step| {
                    let (mark, class) = match step.ok {
                        None => ("…", "running"),
                        Some(true) => ("✓", "ok"),
                        Some(false) => ("✗", "failed"),
                    };
                    view! {
                        <li class=class>
                            <span class="mark" aria-hidden="true">{mark}</span>
                            <span class="name">{step.name}</span>
                            <span class="ms">{step.ms.map(|ms| format!("{ms} ms")).unwrap_or_default()}</span>
                            <span class="detail">{step.detail}</span>
                        </li>
                    }
                }).collect_view()}
            </ol>
        </div>
    }
}

#[component]
fn RollingRestart(cluster: Signal<Option<ClusterView>>) -> impl IntoView {
    let limit = RwSignal::new(60u32);
    let asking = RwSignal::new(false);
    let roll = ServerAction::<RollingRestart>::new();
    let can = Memo::new(move |_| cluster.with(|c| c.as_ref().is_some_and(|c| c.can_roll)));
    let running = Memo::new(move |_| {
        cluster.with(|c| {
            c.as_ref()
                .and_then(|c| c.rolling_restart.as_ref())
                .is_some_and(|r| r.verdict.is_none())
        })
    });
    let shown =
        Memo::new(move |_| cluster.with(|c| c.as_ref().and_then(|c| c.rolling_restart.clone())));
    let go = move |_| {
        asking.set(false);
        roll.dispatch(RollingRestart {
            drain_limit_s: limit.get_untracked(),
        });
    };
    view! {
        <section class="panel" aria-label="rolling restart">
            <h2>"Rolling restart"</h2>
            <p class="muted">
                "Restarts the instances one at a time, as for an N+1 upgrade: drain, wait until it \
                 carries no chat (or the time limit; its remaining chats then move to the others \
                 when it stops), stop, start, enable. Chats keep going throughout."
            </p>
            <div class="controls">
                <label for="drain-limit">"Drain time limit (s)"</label>
                <input
                    id="drain-limit"
                    type="number"
                    min="1"
                    max="3600"
                    prop:value=move || limit.get().to_string()
                    on:input=move |ev| {
                        if let Ok(n) = event_target_value(&ev).parse::<u32>() {
                            limit.set(n.clamp(1, 3600));
                        }
                    }
                />
                <button
                    id="rolling-restart"
                    disabled=move || !can.get() || running.get()
                    on:click=move |_| asking.set(true)
                >
                    "Rolling restart"
                </button>
                {move || (!can.get()).then(|| view! {
                    <span class="why">"needs the confab up supervisor (dashboard.supervisor)"</span>
                })}
            </div>
            {move || asking.get().then(|| view! {
                <div class="confirm" role="dialog" aria-label="confirm rolling restart">
                    <p><strong>"Restart every instance, one at a time?"</strong></p>
                    <button class="primary" id="confirm-rolling" on:click=go>"Restart them"</button>
                    <button class="quiet" on:click=move |_| asking.set(false)>"Cancel"</button>
                </div>
            })}
            {move || roll.value().get().and_then(Result::err).map(|e| view! {
                <p class="error" role="alert">{e.to_string()}</p>
            })}
            {move || shown.get().map(|r| view! { <RunView run=r name="rolling"/> })}
        </section>
    }
}

/// Events shown at most, after the filters.
const EVENTS_SHOWN: usize = 100;

#[component]
fn Events(cluster: Signal<Option<ClusterView>>) -> impl IntoView {
    let instance = RwSignal::new(String::new());
    let id_filter = RwSignal::new(String::new());
    let ids = Memo::new(move |_| {
        cluster.with(|c| {
            c.as_ref()
                .map(|c| c.instances.iter().map(|i| i.id.clone()).collect::<Vec<_>>())
                .unwrap_or_default()
        })
    });
    let shown = Memo::new(move |_| {
        let (instance, id) = (instance.get(), id_filter.get());
        let id = id.trim().to_owned();
        cluster.with(|c| {
            c.as_ref()
                .map(|c| {
                    c.events
                        .iter()
                        .filter(|e| instance.is_empty() || e.instance == instance)
                        .filter(|e| id.is_empty() || e.event_id.to_string().starts_with(&id))
                        .take(EVENTS_SHOWN)
                        .cloned()
                        .collect::<Vec<EventRow>>()
                })
                .unwrap_or_default()
        })
    });
    view! {
        <section class="panel" aria-label="events">
            <h2>"Events"</h2>
            <div class="controls">
                <label for="event-instance">"Instance"</label>
                <select id="event-instance" on:change=move |ev| instance.set(event_target_value(&ev))>
                    <option value="">"all"</option>
                    {move || ids.get().into_iter().map(|id| view! {
                        <option value=id.clone()>{id.clone()}</option>
                    }).collect_view()}
                </select>
                <label for="event-id">"Event id"</label>
                <input
                    id="event-id"
                    type="text"
                    inputmode="numeric"
                    placeholder="e.g. 5952"
                    on:input=move |ev| id_filter.set(event_target_value(&ev))
                />
            </div>
            <div class="table-wrap">
                <table class="events">
                    <thead>
                        <tr>
                            <th>"Time"</th>
                            <th>"Instance"</th>
                            <th class="num">"Event"</th>
                            <th>"Level"</th>
                            <th>"Message"</th>
                        </tr>
                    </thead>
                    <tbody>
                        {move || {
                            let rows = shown.get();
                            if rows.is_empty() {
                                return view! {
                                    <tr><td colspan="5" class="muted">"No numbered events yet."</td></tr>
                                }.into_any();
                            }
                            rows.into_iter().map(|e| {
                                let level = match e.level.as_str() {
                                    "ERROR" => "state bad",
                                    "WARN" => "state warn",
                                    _ => "state calm",
                                };
                                view! {
                                    <tr data-event=e.event_id>
                                        <td>{clock(e.at_ms)}</td>
                                        <td>{e.instance}</td>
                                        <td class="num">{e.event_id}</td>
                                        <td><span class=level>{e.level}</span></td>
                                        <td class="message">{e.message}<span class="why">{e.fields}</span></td>
                                    </tr>
                                }
                            }).collect_view().into_any()
                        }}
                    </tbody>
                </table>
            </div>
        </section>
    }
}

/// One instance's live chats, a page at a time; a click opens a transcript.
#[component]
fn Sessions(selected: RwSignal<Option<String>>) -> impl IntoView {
    let load = ServerAction::<InstanceSessions>::new();
    let open = ServerAction::<ChatTranscript>::new();
    let chat = RwSignal::new(None::<String>);
    let fetch = move |after: String| {
        if let Some(instance) = selected.get_untracked() {
            load.dispatch(InstanceSessions { instance, after });
        }
    };
    Effect::new(move |_| {
        if selected.get().is_some() {
            chat.set(None);
            fetch(String::new());
        }
    });
    move || {
        selected.get().map(|instance| {
            view! {
                <section class="panel" aria-label="chats" id="sessions">
                    <h2>{format!("Chats on {instance}")}</h2>
                    <div class="controls">
                        <button id="sessions-refresh" on:click=move |_| fetch(String::new())>"Refresh"</button>
                        <button class="quiet" on:click=move |_| selected.set(None)>"Close"</button>
                    </div>
                    {move || match load.value().get() {
                        None => view! { <p class="loading">"Loading…"</p> }.into_any(),
                        Some(Err(e)) => view! { <p class="error" role="alert">{e.to_string()}</p> }.into_any(),
                        Some(Ok(page)) => view! { <SessionsTable page chat open/> }.into_any(),
                    }}
                    {move || chat.get().map(|id| view! {
                        <h3>{format!("Transcript of {id}")}</h3>
                        {move || match open.value().get() {
                            None => view! { <p class="loading">"Loading…"</p> }.into_any(),
                            Some(Err(e)) => view! { <p class="error" role="alert">{e.to_string()}</p> }.into_any(),
                            Some(Ok(lines)) => view! { <Transcript lines/> }.into_any(),
                        }}
                    })}
                </section>
            }
        })
    }
}

#[component]
fn SessionsTable(
    page: SessionsView,
    chat: RwSignal<Option<String>>,
    open: ServerAction<ChatTranscript>,
) -> impl IntoView {
    let instance = page.instance.clone();
    if page.sessions.is_empty() {
        return view! { <p class="muted" id="no-sessions">"No chats on this instance."</p> }
            .into_any();
    }
    let next = page.next.clone();
    view! {
        <div class="table-wrap">
            <table class="sessions">
                <thead>
                    <tr>
                        <th>"Chat"</th>
                        <th>"Participants"</th>
                        <th>"State"</th>
                        <th class="num">"Age"</th>
                        <th class="num">"Events"</th>
                    </tr>
                </thead>
                <tbody>
                    {page.sessions.into_iter().map(|s| {
                        let (instance, id) = (instance.clone(), s.id.clone());
                        view! {
                            <tr data-chat=s.id.clone()>
                                <td>
                                    <button class="link" on:click=move |_| {
                                        chat.set(Some(id.clone()));
                                        open.dispatch(ChatTranscript { instance: instance.clone(), chat: id.clone() });
                                    }>{s.id.clone()}</button>
                                </td>
                                <td>{s.participants}</td>
                                <td>{s.state}</td>
                                <td class="num">{short_duration(s.age_s)}</td>
                                <td class="num">{s.events}</td>
                            </tr>
                        }
                    }).collect_view()}
                </tbody>
            </table>
        </div>
        {next.map(|_| view! { <p class="muted">"More chats follow: Refresh shows the first page; the list is ordered by chat id."</p> })}
    }
    .into_any()
}

#[component]
fn Transcript(lines: Vec<TranscriptLine>) -> impl IntoView {
    view! {
        <ol class="transcript" id="transcript">
            {lines.into_iter().map(|l| {
                let what = match l.kind.as_str() {
                    "message" => l.text.clone(),
                    "joined" | "left" if !l.reason.is_empty() => format!("{} ({})", l.kind, l.reason),
                    "closed" => format!("chat closed ({})", l.reason),
                    other => other.to_owned(),
                };
                view! {
                    <li class=format!("kind-{}", l.kind)>
                        <span class="seq">{l.seq}</span>
                        <span class="who">{l.nickname}</span>
                        <span class="what">{what}</span>
                        <span class="at">{l.at}</span>
                    </li>
                }
            }).collect_view()}
        </ol>
    }
}
