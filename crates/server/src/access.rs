//! THE table of who may call what: every RPC served, by full gRPC method path, with the
//! [`Role`] it needs and whether a call is audited. [`crate::auth`] enforces it for every call
//! (an RPC missing here is refused: fail closed) and writes the audit record of the calls marked
//! [`change`]. A new RPC needs one line here; a test walks every method of every service in the
//! served descriptor set and fails if one has no line.
//!
//! Roles are ordered (`admin` ⊇ `sender` ⊇ `writer` ⊇ `reader`), so each line names the least
//! role that may call it.

use sharpsend_db::api_keys::Role;

/// What an RPC needs, and what its audit records.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// `/package.Service/Method`.
    pub path: &'static str,
    /// The least role that may call it.
    pub role: Role,
    /// `Some`: every call is audited, recording the request's `id`, `*_id` and `*_ids` fields
    /// and these extra top-level fields; `None`: a read, not audited (unless refused).
    pub audit: Option<&'static [&'static str]>,
}

/// A read: needs `role`, not audited.
const fn read(path: &'static str, role: Role) -> Rule {
    Rule {
        path,
        role,
        audit: None,
    }
}

/// A call that changes something: needs `role`, audited with the ids and `extra` fields.
const fn change(path: &'static str, role: Role, extra: &'static [&'static str]) -> Rule {
    Rule {
        path,
        role,
        audit: Some(extra),
    }
}

use Role::{Admin, Reader, Sender, Writer};

/// Every RPC served, with its rule.
pub const RULES: &[Rule] = &[
    // SegmentService
    read("/sharpsend.cio.v1.SegmentService/ListSegments", Reader),
    read("/sharpsend.cio.v1.SegmentService/GetSegment", Reader),
    change("/sharpsend.cio.v1.SegmentService/SyncSegments", Writer, &[]),
    read("/sharpsend.cio.v1.SegmentService/ValidateTargeting", Reader),
    change(
        "/sharpsend.cio.v1.SegmentService/CreateSegment",
        Writer,
        &["name"],
    ),
    read("/sharpsend.cio.v1.SegmentService/PreviewSegment", Reader),
    change(
        "/sharpsend.cio.v1.SegmentService/UpdateSegment",
        Writer,
        &[],
    ),
    change(
        "/sharpsend.cio.v1.SegmentService/DeleteSegment",
        Writer,
        &[],
    ),
    change(
        "/sharpsend.cio.v1.SegmentService/AddSegmentMembers",
        Writer,
        &[],
    ),
    change(
        "/sharpsend.cio.v1.SegmentService/RemoveSegmentMembers",
        Writer,
        &[],
    ),
    // ProfileService
    read("/sharpsend.cio.v1.ProfileService/GetProfile", Reader),
    change(
        "/sharpsend.cio.v1.ProfileService/ImportProfiles",
        Writer,
        &[],
    ),
    change(
        "/sharpsend.cio.v1.ProfileService/UpdateAttributes",
        Writer,
        &[],
    ),
    change(
        "/sharpsend.cio.v1.ProfileService/BatchUpdateAttributes",
        Writer,
        &[],
    ),
    change(
        "/sharpsend.cio.v1.ProfileService/TrackEvent",
        Writer,
        &["name"],
    ),
    change(
        "/sharpsend.cio.v1.ProfileService/BatchTrackEvents",
        Writer,
        &[],
    ),
    read("/sharpsend.cio.v1.ProfileService/GetSyncStatus", Reader),
    change(
        "/sharpsend.cio.v1.ProfileService/RetryDeadLetters",
        Writer,
        &[],
    ),
    // CampaignService
    read("/sharpsend.cio.v1.CampaignService/ListCampaigns", Reader),
    read("/sharpsend.cio.v1.CampaignService/GetCampaign", Reader),
    change(
        "/sharpsend.cio.v1.CampaignService/SendAssignment",
        Sender,
        &[],
    ),
    read("/sharpsend.cio.v1.CampaignService/GetSend", Reader),
    read("/sharpsend.cio.v1.CampaignService/ListSends", Reader),
    change(
        "/sharpsend.cio.v1.CampaignService/ResolveSend",
        Sender,
        &["resolution"],
    ),
    change(
        "/sharpsend.cio.v1.CampaignService/TriggerJourneyEvent",
        Sender,
        &["event_name"],
    ),
    read(
        "/sharpsend.cio.v1.CampaignService/GetCampaignMetrics",
        Reader,
    ),
    // ABTestService
    read("/sharpsend.cio.v1.ABTestService/PlanTest", Reader),
    change("/sharpsend.cio.v1.ABTestService/CreateTest", Sender, &[]),
    read("/sharpsend.cio.v1.ABTestService/GetTest", Reader),
    read("/sharpsend.cio.v1.ABTestService/ListTests", Reader),
    change("/sharpsend.cio.v1.ABTestService/StartTest", Sender, &[]),
    change("/sharpsend.cio.v1.ABTestService/CancelTest", Sender, &[]),
    change(
        "/sharpsend.cio.v1.ABTestService/DeclareWinner",
        Sender,
        &["variant"],
    ),
    // AnalyticsService: reads and metrics; the quarantine holds raw webhook bodies (people's
    // addresses), so only operators list it.
    read("/sharpsend.cio.v1.AnalyticsService/WatchEngagement", Reader),
    read(
        "/sharpsend.cio.v1.AnalyticsService/ListQuarantinedWebhooks",
        Admin,
    ),
    read(
        "/sharpsend.cio.v1.AnalyticsService/GetAssignmentAnalytics",
        Reader,
    ),
    read(
        "/sharpsend.cio.v1.AnalyticsService/ListAssignmentPerformance",
        Reader,
    ),
    read("/sharpsend.cio.v1.AnalyticsService/ExportReport", Reader),
    read("/sharpsend.cio.v1.AnalyticsService/SuggestSegments", Reader),
    // OpsService: following a run is a read (a writer's SyncSegments answers a run to follow).
    read("/sharpsend.cio.v1.OpsService/ListJobs", Reader),
    read("/sharpsend.cio.v1.OpsService/ListJobRuns", Reader),
    change("/sharpsend.cio.v1.OpsService/RunJob", Admin, &["job"]),
    read("/sharpsend.cio.v1.OpsService/GetJobRun", Reader),
    // AdminService
    change(
        "/sharpsend.cio.v1.AdminService/CreateApiKey",
        Admin,
        &["name", "role"],
    ),
    read("/sharpsend.cio.v1.AdminService/ListApiKeys", Admin),
    change("/sharpsend.cio.v1.AdminService/RevokeApiKey", Admin, &[]),
    read("/sharpsend.cio.v1.AdminService/ListAuditEvents", Admin),
    // Workspaces: the audit records `id` / `site_id` and the name, never a key field.
    change(
        "/sharpsend.cio.v1.AdminService/CreateWorkspace",
        Admin,
        &["name", "region"],
    ),
    change(
        "/sharpsend.cio.v1.AdminService/UpdateWorkspace",
        Admin,
        &["name"],
    ),
    read("/sharpsend.cio.v1.AdminService/GetWorkspace", Admin),
    read("/sharpsend.cio.v1.AdminService/ListWorkspaces", Admin),
    change(
        "/sharpsend.cio.v1.AdminService/DisableWorkspace",
        Admin,
        &[],
    ),
];

/// RPCs that, beyond their role, need a key bound to every workspace (a `SHARPSEND_API_KEYS`
/// key or an all-workspaces admin): a workspace-bound admin is answered `PERMISSION_DENIED` by
/// the handler ([`crate::admin`]), with nothing more said.
pub const ALL_WORKSPACES_ONLY: &[&str] = &[
    "/sharpsend.cio.v1.AdminService/CreateWorkspace",
    "/sharpsend.cio.v1.AdminService/ListWorkspaces",
    "/sharpsend.cio.v1.AdminService/DisableWorkspace",
];

/// Paths open to every caller without a key: health checks and reflection.
pub fn is_open(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

/// The rule of `path`, if it has one.
pub fn rule(path: &str) -> Option<&'static Rule> {
    RULES.iter().find(|r| r.path == path)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prost::Message as _;

    use super::*;

    /// Every method of every service in `sharpsend.cio.v1`'s descriptor set, as a path.
    fn served_methods() -> BTreeSet<String> {
        let set = prost_types::FileDescriptorSet::decode(sharpsend_proto::FILE_DESCRIPTOR_SET)
            .unwrap_or_else(|e| panic!("descriptor set: {e}"));
        let mut paths = BTreeSet::new();
        for file in set.file {
            let package = file.package().to_owned();
            for service in file.service {
                for method in &service.method {
                    paths.insert(format!("/{package}.{}/{}", service.name(), method.name()));
                }
            }
        }
        paths
    }

    #[test]
    fn every_served_rpc_has_exactly_one_rule() {
        let served = served_methods();
        assert!(served.len() > 30, "{served:?}");
        let missing: Vec<_> = served.iter().filter(|p| rule(p).is_none()).collect();
        assert!(
            missing.is_empty(),
            "RPCs without a role in access::RULES (add one line each): {missing:?}"
        );
        let mut seen = BTreeSet::new();
        for r in RULES {
            assert!(seen.insert(r.path), "{} listed twice", r.path);
            assert!(served.contains(r.path), "{} is not served", r.path);
        }
    }

    #[test]
    fn open_paths_are_only_health_and_reflection() {
        assert!(is_open("/grpc.health.v1.Health/Check"));
        assert!(is_open(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!is_open("/sharpsend.cio.v1.AdminService/ListApiKeys"));
        assert!(rule("/sharpsend.cio.v1.SegmentService/NewCall").is_none());
    }

    #[test]
    fn all_workspaces_only_rpcs_are_admin_rpcs() {
        for path in ALL_WORKSPACES_ONLY {
            assert!(
                rule(path).is_some_and(|r| r.role == Admin),
                "{path} needs an Admin rule"
            );
        }
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Admin.includes(Sender) && Sender.includes(Writer) && Writer.includes(Reader));
        assert!(!Reader.includes(Writer) && !Writer.includes(Sender) && !Sender.includes(Admin));
    }
}
