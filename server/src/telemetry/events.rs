//! Numbered lifecycle events (the README's event catalog). Each is logged
//! with an `event_id` field; 59245, 59520 and 59521 keep the reference chat
//! server's numbers and texts so that existing alarms match.

/// `deleting session with sid=<id> and intx=<id> (current sessions=<n>)`
pub const SESSION_DELETED: u32 = 59245;
/// `Cassandra status changed to "UNAVAILABLE"`
pub const CASSANDRA_UNAVAILABLE: u32 = 59520;
/// `Cassandra status changed to "AVAILABLE"`
pub const CASSANDRA_AVAILABLE: u32 = 59521;

/// Instance started and serving.
pub const INSTANCE_STARTED: u32 = 59600;
/// Instance shutting down (SIGTERM / Ctrl-C): no new requests, pending saves flushed.
pub const INSTANCE_STOPPING: u32 = 59601;
/// Session created on this instance.
pub const SESSION_CREATED: u32 = 59602;
/// Restoration of a session started on this instance.
pub const RESTORE_STARTED: u32 = 59603;
/// Restoration done: the session is live here with a new epoch.
pub const RESTORE_DONE: u32 = 59604;
/// Restoration refused or failed.
pub const RESTORE_FAILED: u32 = 59605;
/// A transcript save failed; it will be retried.
pub const SAVE_RETRY: u32 = 59606;
/// A transcript save failed after all attempts (handled per transcript-save-on-error).
pub const SAVE_FAILED: u32 = 59607;
/// A write of this instance was refused because another instance owns the session now.
pub const SESSION_FENCED: u32 = 59608;
/// Instance disabled (draining): no new sessions.
pub const INSTANCE_DISABLED: u32 = 59609;
/// Instance enabled again.
pub const INSTANCE_ENABLED: u32 = 59610;
/// Drain complete: a disabled instance hosts no session any more.
pub const DRAIN_COMPLETE: u32 = 59611;
/// Session store status changed (any backend).
pub const STORE_STATUS_CHANGED: u32 = 59612;
/// A closed chat's final transcript could not be stored even in the
/// background; its intermediate records stay in the session store.
pub const FINAL_TRANSCRIPT_ABANDONED: u32 = 59613;
/// The closing of a chat closed after save errors was refused by the store
/// (another instance owns the chat now, or it is gone).
pub const CLOSING_REFUSED: u32 = 59614;
/// The closing of a chat closed after save errors could not be stored: this
/// instance keeps answering 409 for it while it runs.
pub const CLOSING_ABANDONED: u32 = 59615;
/// A call on the internal API or channel without the cluster secret (or
/// with a wrong one) was refused (logged at most once a second).
pub const INTERNAL_AUTH_REFUSED: u32 = 59616;
/// A restoration was refused because the session store's history of the
/// chat has a gap below a completed claim's cut (a row lost or expired):
/// taking it over would drop acknowledged events.
pub const HISTORY_CORRUPT: u32 = 59617;
/// A live chat's records were gone from the session store under their
/// owner (expired: the TTL tables): the chat was closed from what the
/// instance holds, its final transcript stored from memory.
pub const RECORDS_LOST: u32 = 59618;

/// Dashboard: a sign-in with a wrong admin token was refused.
pub const DASHBOARD_SIGNIN_REFUSED: u32 = 59620;

/// Gateway: an instance failed its health check or a request.
pub const GATEWAY_INSTANCE_DOWN: u32 = 59700;
/// Gateway: an instance is healthy again.
pub const GATEWAY_INSTANCE_UP: u32 = 59701;
/// Gateway: a chat moved to another instance.
pub const GATEWAY_FAILOVER: u32 = 59702;
/// Gateway: a failover could not find a live instance.
pub const GATEWAY_FAILOVER_FAILED: u32 = 59703;
/// Gateway: discovery found an instance in the session store's registry.
pub const GATEWAY_INSTANCE_DISCOVERED: u32 = 59704;
/// Gateway: a discovered instance's heartbeat stopped (no new chats), or
/// came back.
pub const GATEWAY_INSTANCE_REGISTRATION: u32 = 59705;
