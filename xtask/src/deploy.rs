//! `cargo xtask deploy <env> [--tag TAG] [--image NAME] [--config FILE] [--dry-run] [--timeout SECONDS]`: renders
//! `deploy/k8s/overlays/<env>` with the image and MoltBot config chosen, checks every object against the
//! Kubernetes API's types and the policies a platform reviewer would ask for, then shows the diff against the
//! cluster, applies it server-side, waits for each rollout and reports each service's readiness. `--dry-run`
//! prints what it would apply and needs no cluster.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, StatefulSet},
        autoscaling::v2::HorizontalPodAutoscaler,
        core::v1::{ConfigMap, Namespace, PodTemplateSpec, Secret, Service},
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

/// Who owns the fields this command applies (server-side apply).
const FIELD_MANAGER: &str = "moltbot-xtask";
/// The MoltBot image's name in the manifests; `--image` and `--tag` replace it.
const IMAGE: &str = "moltbot";
/// The CUDA image's (deploy/Dockerfile.cuda), for the GPU workers of `prod-gpu`: `--image` with `-cuda`.
const CUDA_IMAGE: &str = "moltbot-cuda";

#[derive(Debug)]
struct Args {
    env: String,
    image: String,
    tag: String,
    config: Option<PathBuf>,
    dry_run: bool,
    timeout_s: u64,
}

fn parse(args: &[String]) -> anyhow::Result<Args> {
    let usage = "usage: cargo xtask deploy <dev|prod|prod-gpu> [--tag TAG] [--image NAME] [--config FILE] [--dry-run] \
                 [--timeout SECONDS]";
    let mut parsed = Args {
        env: String::new(),
        image: IMAGE.into(),
        tag: String::new(),
        config: None,
        dry_run: false,
        timeout_s: 600,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().cloned().with_context(|| format!("{name} needs a value; {usage}"));
        match arg.as_str() {
            "--tag" => parsed.tag = value("--tag")?,
            "--image" => parsed.image = value("--image")?,
            "--config" => parsed.config = Some(value("--config")?.into()),
            "--timeout" => parsed.timeout_s = value("--timeout")?.parse().context("--timeout takes seconds")?,
            "--dry-run" => parsed.dry_run = true,
            env if !env.starts_with('-') && parsed.env.is_empty() => parsed.env = env.into(),
            other => bail!("unknown argument `{other}`; {usage}"),
        }
    }
    if parsed.env.is_empty() {
        bail!("which environment? {usage} (environments: {})", environments()?.join(", "));
    }
    if parsed.tag.is_empty() {
        parsed.tag = git_tag().unwrap_or_else(|| env!("CARGO_PKG_VERSION").into());
    }
    Ok(parsed)
}

/// The image tag when none is given: the commit, as CI tags the images it builds.
fn git_tag() -> Option<String> {
    let out = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).current_dir(crate::root()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn overlays() -> PathBuf {
    crate::root().join("deploy/k8s/overlays")
}

fn environments() -> anyhow::Result<Vec<String>> {
    let mut envs: Vec<String> = std::fs::read_dir(overlays())
        .context("deploy/k8s/overlays")?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    envs.sort();
    Ok(envs)
}

pub fn main(args: &[String]) -> anyhow::Result<()> {
    let args = parse(args)?;
    let rendered = render(&args.env, &args.image, &args.tag, args.config.as_deref())?;
    let objects = objects(&rendered)?;
    let problems: Vec<String> = validate(&objects).into_iter().chain(policy(&objects)).collect();
    if !problems.is_empty() {
        bail!("the {} overlay does not pass its checks:\n  - {}", args.env, problems.join("\n  - "));
    }
    let namespace = namespace(&objects)?;
    let secrets = needed_secrets(&objects);
    if args.dry_run {
        print!("{rendered}");
        eprintln!(
            "deploy {}: {} objects for namespace {namespace}, all valid and within policy:",
            args.env,
            objects.len()
        );
        for o in &objects {
            eprintln!("  {} {}", str_at(o, "/kind"), str_at(o, "/metadata/name"));
        }
        eprintln!("Secrets it reads (not rendered; `cargo xtask deploy dev` makes missing ones):");
        for (name, keys) in &secrets {
            eprintln!("  {name}: {}", keys.iter().cloned().collect::<Vec<_>>().join(", "));
        }
        eprintln!("dry run: nothing applied (without --dry-run: kubectl diff, apply --server-side, rollout status)");
        return Ok(());
    }
    let kubectl = Kubectl::find()?;
    kubectl.reachable()?;
    // The namespace first: the Secrets live in it.
    let ns_object: Vec<&Value> = objects.iter().filter(|o| str_at(o, "/kind") == "Namespace").collect();
    kubectl.apply(&to_yaml(&ns_object)?)?;
    kubectl.ensure_secrets(&namespace, &secrets, args.env == "dev")?;
    eprintln!("deploy {}: what changes in namespace {namespace} (kubectl diff --server-side):", args.env);
    kubectl.diff(&rendered)?;
    kubectl.apply(&rendered)?;
    let workloads: Vec<(String, String)> = objects
        .iter()
        .filter(|o| matches!(str_at(o, "/kind"), "Deployment" | "StatefulSet"))
        .map(|o| (str_at(o, "/kind").to_lowercase(), str_at(o, "/metadata/name").to_owned()))
        .collect();
    for (kind, name) in &workloads {
        kubectl.rollout(&namespace, kind, name, args.timeout_s)?;
    }
    kubectl.report(&namespace, &workloads)
}

/// Renders the overlay for `env` through a kustomization of its own under `target/`, which sets the MoltBot
/// image and, with `config`, replaces the MoltBot config (after checking it loads).
pub fn render(env: &str, image: &str, tag: &str, config: Option<&Path>) -> anyhow::Result<String> {
    if !overlays().join(env).join("kustomization.yaml").is_file() {
        bail!("no environment `{env}`: deploy/k8s/overlays has {}", environments()?.join(", "));
    }
    static RENDERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RENDERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Three levels below the repository, so the overlay is `../../../deploy/...` (kustomize takes no absolute path).
    let dir = crate::root().join("target/xtask-deploy").join(format!("{env}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot make {}", dir.display()))?;
    let cuda = format!("{image}-cuda");
    let mut kustomization = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../../../deploy/k8s/overlays/{env}]\n\
         images: [{{ name: {IMAGE}, newName: {image:?}, newTag: {tag:?} }}, \
         {{ name: {CUDA_IMAGE}, newName: {cuda:?}, newTag: {tag:?} }}]\n"
    );
    if let Some(config) = config {
        let text = std::fs::read_to_string(config).with_context(|| format!("cannot read {}", config.display()))?;
        moltbot_config::Config::from_figment(&figment_of(&text))
            .with_context(|| format!("{} is not a MoltBot config that loads", config.display()))?;
        std::fs::write(dir.join("config.yaml"), text)?;
        kustomization
            .push_str("configMapGenerator: [{ name: moltbot-config, behavior: replace, files: [config.yaml] }]\n");
    }
    std::fs::write(dir.join("kustomization.yaml"), kustomization)?;
    let out = Command::new("kubectl").arg("kustomize").arg(&dir).output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.map_err(|e| missing_kubectl(&e))?;
    if !out.status.success() {
        bail!("kubectl kustomize of the {env} overlay failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8(out.stdout).context("kustomize wrote non-UTF-8")
}

fn figment_of(yaml: &str) -> figment::Figment {
    use figment::providers::{Format, Serialized, Yaml};
    figment::Figment::from(Serialized::defaults(moltbot_config::Config::default())).merge(Yaml::string(yaml))
}

fn missing_kubectl(e: &std::io::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot run kubectl ({e}); install it (Debian: `apt-get install kubectl`; else \
         https://kubernetes.io/docs/tasks/tools/) — kustomize comes with it"
    )
}

/// The rendered stream's objects.
pub fn objects(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let value = Value::deserialize(document).context("kustomize's output is not YAML")?;
        if !value.is_null() {
            objects.push(value);
        }
    }
    Ok(objects)
}

fn to_yaml(objects: &[&Value]) -> anyhow::Result<String> {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(o)?);
    }
    Ok(out)
}

fn str_at<'a>(o: &'a Value, pointer: &str) -> &'a str {
    o.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn id(o: &Value) -> String {
    format!("{} {}", str_at(o, "/kind"), str_at(o, "/metadata/name"))
}

/// Every object read as its Kubernetes API type: a wrong type or a missing required field fails to read, and a
/// field the type does not have (a misspelling, a field at the wrong level) is named.
pub fn validate(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .filter_map(|o| {
            let checked = match (str_at(o, "/apiVersion"), str_at(o, "/kind")) {
                ("v1", "Namespace") => typed::<Namespace>(o),
                ("v1", "ConfigMap") => typed::<ConfigMap>(o),
                ("v1", "Secret") => typed::<Secret>(o),
                ("v1", "Service") => typed::<Service>(o),
                ("apps/v1", "Deployment") => typed::<Deployment>(o),
                ("apps/v1", "StatefulSet") => typed::<StatefulSet>(o),
                ("networking.k8s.io/v1", "NetworkPolicy") => typed::<NetworkPolicy>(o),
                ("policy/v1", "PodDisruptionBudget") => typed::<PodDisruptionBudget>(o),
                ("autoscaling/v2", "HorizontalPodAutoscaler") => typed::<HorizontalPodAutoscaler>(o),
                ("keda.sh/v1alpha1", "ScaledObject") => typed::<ScaledObject>(o),
                (api, kind) => Err(format!("no schema known for {api} {kind}; add its type to xtask/src/deploy.rs")),
            };
            checked.err().map(|e| format!("{}: {e}", id(o)))
        })
        .collect()
}

fn typed<T: DeserializeOwned + Serialize>(o: &Value) -> Result<(), String> {
    let typed: T = serde_json::from_value(o.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut unknown = Vec::new();
    fields_not_in(o, &back, "", &mut unknown);
    if unknown.is_empty() { Ok(()) } else { Err(format!("not a field of its type: {}", unknown.join(", "))) }
}

/// The paths in `original` that did not survive a trip through the typed object (`back`).
fn fields_not_in(original: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (original, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (key, value) in o {
                let here = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                match b.get(key) {
                    None if !value.is_null() => out.push(here),
                    None => {}
                    Some(kept) => fields_not_in(value, kept, &here, out),
                }
            }
        }
        (Value::Array(o), Value::Array(b)) => {
            for (i, (value, kept)) in o.iter().zip(b).enumerate() {
                fields_not_in(value, kept, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// KEDA's `ScaledObject` (keda.sh/v1alpha1), the fields MoltBot uses; k8s-openapi has only the core API.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ScaledObject {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: ScaledObjectSpec,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ScaledObjectSpec {
    scale_target_ref: ScaleTarget,
    #[serde(skip_serializing_if = "Option::is_none")]
    polling_interval: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cooldown_period: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_replica_count: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_replica_count: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    advanced: Option<Advanced>,
    triggers: Vec<Trigger>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Advanced {
    #[serde(skip_serializing_if = "Option::is_none")]
    restore_to_original_replica_count: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    horizontal_pod_autoscaler_config: Option<HpaConfig>,
}

/// What KEDA passes on to the HPA it makes.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HpaConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    behavior: Option<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscalerBehavior>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ScaleTarget {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Trigger {
    #[serde(rename = "type")]
    kind: String,
    metadata: BTreeMap<String, String>,
}

/// The pod template of a Deployment or StatefulSet, with its kind and name.
fn workloads(objects: &[Value]) -> Vec<(String, &Value, PodTemplateSpec)> {
    objects
        .iter()
        .filter(|o| matches!(str_at(o, "/kind"), "Deployment" | "StatefulSet"))
        .filter_map(|o| {
            let template = serde_json::from_value(o.pointer("/spec/template")?.clone()).ok()?;
            Some((id(o), o, template))
        })
        .collect()
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn match_labels(selector: Option<&LabelSelector>) -> BTreeMap<String, String> {
    selector.and_then(|s| s.match_labels.clone()).unwrap_or_default()
}

/// What a reviewer checks before a manifest reaches a cluster: every pod restricted (non-root, read-only root,
/// no privilege, no token), every container with requests, limits and probes and a pinned image, long enough a
/// grace period to drain streams, every Service reaching a pod and guarded by its own NetworkPolicy behind a
/// default deny, autoscaled workloads without a fixed replica count, a disruption budget for every workload of
/// more than one pod, and a MoltBot config that loads and listens beyond loopback.
pub fn policy(objects: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let config = moltbot_config(objects, &mut problems);
    let pods = workloads(objects);
    let scaled: BTreeSet<String> = objects
        .iter()
        .filter(|o| matches!(str_at(o, "/kind"), "HorizontalPodAutoscaler" | "ScaledObject"))
        .map(|o| str_at(o, "/spec/scaleTargetRef/name").to_owned())
        .collect();
    for (name, object, template) in &pods {
        let mut bad = |what: String| problems.push(format!("{name}: {what}"));
        let labels = template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
        let selector: Option<LabelSelector> =
            object.pointer("/spec/selector").and_then(|s| serde_json::from_value(s.clone()).ok());
        if match_labels(selector.as_ref()).is_empty() || !labels_match(&match_labels(selector.as_ref()), &labels) {
            bad("its selector does not select its own pods".into());
        }
        let Some(spec) = &template.spec else {
            bad("no pod spec".into());
            continue;
        };
        let pod_security = spec.security_context.clone().unwrap_or_default();
        if pod_security.run_as_non_root != Some(true) || pod_security.run_as_user.is_none_or(|u| u == 0) {
            bad("pods must set runAsNonRoot: true and a non-zero runAsUser".into());
        }
        if pod_security.seccomp_profile.as_ref().map(|p| p.type_.as_str()) != Some("RuntimeDefault") {
            bad("pods must use the RuntimeDefault seccomp profile".into());
        }
        if spec.automount_service_account_token != Some(false) {
            bad("pods must not mount a service-account token (automountServiceAccountToken: false)".into());
        }
        let moltbot = spec.containers.iter().any(|c| c.image.as_deref().is_some_and(|i| i.contains(IMAGE)));
        if moltbot && let Some(config) = &config {
            let grace = spec.termination_grace_period_seconds.unwrap_or(30);
            let drains = !name.ends_with("session-store");
            if drains && grace < config.queue.job_timeout as i64 {
                bad(format!(
                    "terminationGracePeriodSeconds {grace} is shorter than queue.job_timeout ({} s): streams would \
                     be cut at a rollout",
                    config.queue.job_timeout
                ));
            }
        }
        for c in &spec.containers {
            let mut bad = |what: &str| problems.push(format!("{name} container {}: {what}", c.name));
            let security = c.security_context.clone().unwrap_or_default();
            if security.allow_privilege_escalation != Some(false) || security.read_only_root_filesystem != Some(true) {
                bad("needs allowPrivilegeEscalation: false and readOnlyRootFilesystem: true");
            }
            if !security.capabilities.and_then(|c| c.drop).is_some_and(|d| d.iter().any(|d| d == "ALL")) {
                bad("must drop ALL capabilities");
            }
            if security.run_as_user == Some(0) || security.run_as_non_root == Some(false) {
                bad("runs as root");
            }
            let resources = c.resources.clone().unwrap_or_default();
            for (kind, set) in [("requests", resources.requests), ("limits", resources.limits)] {
                let set = set.unwrap_or_default();
                if !set.contains_key("cpu") || !set.contains_key("memory") {
                    bad(&format!("needs cpu and memory {kind}"));
                }
            }
            if c.readiness_probe.is_none() || c.liveness_probe.is_none() {
                bad("needs a readiness and a liveness probe");
            }
            if name.ends_with("inference-worker") && c.startup_probe.is_none() {
                bad("needs a startup probe: the model loads before the worker answers");
            }
            match c.image.as_deref() {
                Some(image) if image.contains('@') => {}
                Some(image) => match image.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')) {
                    Some((_, "latest")) | None => bad(&format!("image {image} must name a version, not latest")),
                    Some(_) => {}
                },
                None => bad("has no image"),
            }
        }
        let replicas = object.pointer("/spec/replicas").and_then(Value::as_i64);
        let short = str_at(object, "/metadata/name");
        if scaled.contains(short) && replicas.is_some() {
            problems.push(format!("{name}: autoscaled, so it must not set replicas (each deploy would reset them)"));
        }
        let budgeted = objects.iter().filter(|o| str_at(o, "/kind") == "PodDisruptionBudget").any(|o| {
            let selector: Option<LabelSelector> =
                o.pointer("/spec/selector").and_then(|s| serde_json::from_value(s.clone()).ok());
            let wanted = match_labels(selector.as_ref());
            !wanted.is_empty() && labels_match(&wanted, &labels)
        });
        if (scaled.contains(short) || replicas.unwrap_or(1) > 1) && !budgeted {
            problems.push(format!("{name}: runs several pods but no PodDisruptionBudget covers them"));
        }
    }
    services(objects, &pods, &mut problems);
    autoscalers(objects, config.as_ref(), &mut problems);
    let namespaces: Vec<&Value> = objects.iter().filter(|o| str_at(o, "/kind") == "Namespace").collect();
    match namespaces.as_slice() {
        [ns] if str_at(ns, "/metadata/labels/pod-security.kubernetes.io~1enforce") == "restricted" => {}
        _ => problems
            .push("the overlay must make one Namespace that enforces the restricted Pod Security Standard".into()),
    }
    problems
}

/// Each Service selects a workload's pods and a port they open, and a NetworkPolicy of its own (besides the
/// default deny) says who may reach them.
fn services(objects: &[Value], pods: &[(String, &Value, PodTemplateSpec)], problems: &mut Vec<String>) {
    let policies: Vec<NetworkPolicy> = objects
        .iter()
        .filter(|o| str_at(o, "/kind") == "NetworkPolicy")
        .filter_map(|o| serde_json::from_value(o.clone()).ok())
        .collect();
    let default_deny = policies.iter().any(|p| {
        let spec = p.spec.clone().unwrap_or_default();
        match_labels(spec.pod_selector.as_ref()).is_empty()
            && spec.ingress.is_none_or(|rules| rules.is_empty())
            && spec.policy_types.is_some_and(|t| t.iter().any(|t| t == "Ingress"))
    });
    if !default_deny {
        problems.push("no default-deny ingress NetworkPolicy: pods would be reachable from anywhere".into());
    }
    for o in objects.iter().filter(|o| str_at(o, "/kind") == "Service") {
        let Ok(service) = serde_json::from_value::<Service>(o.clone()) else { continue };
        let spec = service.spec.unwrap_or_default();
        let selector = spec.selector.unwrap_or_default();
        let name = id(o);
        let backing: Vec<_> = pods
            .iter()
            .filter(|(_, _, t)| {
                let labels = t.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
                !selector.is_empty() && labels_match(&selector, &labels)
            })
            .collect();
        if backing.is_empty() {
            problems.push(format!("{name}: selects no workload's pods"));
            continue;
        }
        for port in spec.ports.unwrap_or_default() {
            let target = port.target_port.clone();
            let opened = backing.iter().any(|(_, _, t)| {
                t.spec.iter().flat_map(|s| &s.containers).flat_map(|c| c.ports.iter().flatten()).any(
                    |p| match &target {
                        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(n)) => {
                            p.name.as_deref() == Some(n)
                        }
                        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                            p.container_port == *n
                        }
                        None => p.container_port == port.port,
                    },
                )
            });
            if !opened {
                problems.push(format!("{name}: port {} reaches no container port", port.port));
            }
        }
        let guarded = policies.iter().any(|p| {
            let wanted = match_labels(p.spec.as_ref().and_then(|s| s.pod_selector.as_ref()));
            !wanted.is_empty() && labels_match(&wanted, &selector)
        });
        if !guarded {
            problems.push(format!("{name}: no NetworkPolicy of its own selects its pods"));
        }
    }
}

/// Autoscalers point at workloads that exist; KEDA's NATS trigger watches the stream and consumer the workers use,
/// on the NATS in this namespace.
fn autoscalers(objects: &[Value], config: Option<&moltbot_config::Config>, problems: &mut Vec<String>) {
    let deployments: BTreeSet<&str> =
        objects.iter().filter(|o| str_at(o, "/kind") == "Deployment").map(|o| str_at(o, "/metadata/name")).collect();
    for o in objects.iter().filter(|o| matches!(str_at(o, "/kind"), "HorizontalPodAutoscaler" | "ScaledObject")) {
        let target = str_at(o, "/spec/scaleTargetRef/name");
        if !deployments.contains(target) {
            problems.push(format!("{}: scales {target}, which is not a Deployment here", id(o)));
        }
        let triggers = o.pointer("/spec/triggers").and_then(Value::as_array).cloned().unwrap_or_default();
        for t in triggers.iter().filter(|t| str_at(t, "/type") == "nats-jetstream") {
            let endpoint = str_at(t, "/metadata/natsServerMonitoringEndpoint");
            let wanted = format!("moltbot-nats.{}.svc.cluster.local:8222", str_at(o, "/metadata/namespace"));
            if endpoint != wanted {
                problems.push(format!("{}: watches NATS at {endpoint}, not this namespace's ({wanted})", id(o)));
            }
            if str_at(t, "/metadata/stream") != moltbot_queue::STREAM {
                problems.push(format!("{}: watches a stream other than {}", id(o), moltbot_queue::STREAM));
            }
            if let Some(config) = config {
                let consumer = moltbot_queue::worker_consumer(&config.model_provider.model_name);
                if str_at(t, "/metadata/consumer") != consumer {
                    problems.push(format!(
                        "{}: watches consumer {}, but the workers of {} pull from {consumer}",
                        id(o),
                        str_at(t, "/metadata/consumer"),
                        config.model_provider.model_name
                    ));
                }
            }
        }
    }
}

/// The MoltBot config in the `moltbot-config` ConfigMap, loaded as the services will load it; its services must
/// listen beyond loopback, or no other pod reaches them.
fn moltbot_config(objects: &[Value], problems: &mut Vec<String>) -> Option<moltbot_config::Config> {
    let map = objects
        .iter()
        .find(|o| str_at(o, "/kind") == "ConfigMap" && str_at(o, "/metadata/name").starts_with("moltbot-config"));
    let Some(text) = map.and_then(|m| m.pointer("/data/config.yaml")).and_then(Value::as_str) else {
        problems.push("no ConfigMap moltbot-config with a config.yaml".into());
        return None;
    };
    let config = match moltbot_config::Config::from_figment(&figment_of(text)) {
        Ok(config) => config,
        Err(e) => {
            problems.push(format!("ConfigMap moltbot-config: config.yaml does not load: {e:#}"));
            return None;
        }
    };
    for (key, addr) in [
        ("gateway.listen", &config.gateway.listen),
        ("dialogue_manager.listen", &config.dialogue_manager.listen),
        ("session_store.listen", &config.session_store.listen),
        ("inference_worker.listen", &config.inference_worker.listen),
    ] {
        if addr.ip().is_loopback() {
            problems.push(format!("ConfigMap moltbot-config: {key} is {addr}; no other pod could reach it"));
        }
    }
    Some(config)
}

fn namespace(objects: &[Value]) -> anyhow::Result<String> {
    let spaces: BTreeSet<&str> = objects.iter().map(|o| str_at(o, "/metadata/namespace")).collect();
    match spaces.into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().as_slice() {
        [one] => Ok((*one).to_owned()),
        more => bail!("the overlay must put everything in one namespace, not {more:?}"),
    }
}

/// The Secrets (and their keys) that the pods read.
pub fn needed_secrets(objects: &[Value]) -> BTreeMap<String, BTreeSet<String>> {
    let mut secrets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (_, _, template) in workloads(objects) {
        for c in template.spec.iter().flat_map(|s| &s.containers) {
            for env in c.env.iter().flatten() {
                if let Some(r) = env.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()) {
                    secrets.entry(r.name.clone()).or_default().insert(r.key.clone());
                }
            }
        }
    }
    secrets
}

/// kubectl, with the cluster it is pointed at (KUBECONFIG, unless `kubeconfig` names another file).
struct Kubectl {
    kubeconfig: Option<PathBuf>,
}

impl Kubectl {
    fn find() -> anyhow::Result<Self> {
        Command::new("kubectl").args(["version", "--client"]).output().map_err(|e| missing_kubectl(&e))?;
        Ok(Self { kubeconfig: None })
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<std::process::Output> {
        let mut command = Command::new("kubectl");
        if let Some(file) = &self.kubeconfig {
            command.env("KUBECONFIG", file);
        }
        let mut child = command
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| missing_kubectl(&e))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            use std::io::Write;
            pipe.write_all(text.as_bytes()).context("writing to kubectl")?;
        }
        Ok(child.wait_with_output()?)
    }

    /// A cluster answers, or the error says which context kubectl tried and how to point it at one.
    fn reachable(&self) -> anyhow::Result<()> {
        let out = self.run(&["version", "--request-timeout=10s", "-o", "json"], None)?;
        if !out.status.success() {
            let context = self.run(&["config", "current-context"], None).ok().filter(|o| o.status.success());
            let context = context.map_or("none set".into(), |o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
            let why = String::from_utf8_lossy(&out.stderr);
            bail!(
                "no Kubernetes cluster answers kubectl (context: {context}): {}\nPoint kubectl at one (KUBECONFIG=…, \
                 or `kubectl config use-context …`), or see what would be applied with --dry-run",
                why.lines().last().unwrap_or("").trim()
            );
        }
        Ok(())
    }

    fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        let manager = format!("--field-manager={FIELD_MANAGER}");
        let out = self.run(&["apply", "--server-side", &manager, "-f", "-"], Some(yaml))?;
        eprint!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            bail!("kubectl apply --server-side failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Prints what would change; kubectl diff exits 1 when something does, above 1 when it failed.
    fn diff(&self, yaml: &str) -> anyhow::Result<()> {
        let manager = format!("--field-manager={FIELD_MANAGER}");
        let out = self.run(&["diff", "--server-side", &manager, "-f", "-"], Some(yaml))?;
        match out.status.code() {
            Some(0) => eprintln!("  (no changes)"),
            Some(1) => print!("{}", String::from_utf8_lossy(&out.stdout)),
            _ => bail!("kubectl diff failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
        }
        Ok(())
    }

    /// Missing Secrets: made with random values in `dev`, else named with the command that makes them.
    fn ensure_secrets(
        &self,
        namespace: &str,
        secrets: &BTreeMap<String, BTreeSet<String>>,
        make: bool,
    ) -> anyhow::Result<()> {
        let mut missing = Vec::new();
        for (name, keys) in secrets {
            if self.run(&["-n", namespace, "get", "secret", name], None)?.status.success() {
                continue;
            }
            if make {
                // Values start with a letter: NATS reads its passwords as config values, where leading digits
                // make a number. The Secret goes in on stdin, not in kubectl's arguments.
                let data: serde_json::Map<String, Value> = keys
                    .iter()
                    .map(|key| {
                        let secret = format!("p{}", random_hex());
                        let value = if key == "api_keys" { format!("[\"{secret}\"]") } else { secret };
                        (key.clone(), value.into())
                    })
                    .collect();
                let secret = serde_json::json!({
                    "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": { "name": name, "namespace": namespace },
                    "stringData": data,
                });
                let out = self.run(&["create", "-f", "-"], Some(&secret.to_string()))?;
                if !out.status.success() {
                    bail!("cannot make Secret {name}: {}", String::from_utf8_lossy(&out.stderr).trim());
                }
                eprintln!(
                    "made Secret {name} in {namespace} with random {}",
                    keys.iter().cloned().collect::<Vec<_>>().join(", ")
                );
            } else {
                let keys: Vec<String> = keys.iter().map(|k| format!("--from-literal={k}=…")).collect();
                missing.push(format!("kubectl -n {namespace} create secret generic {name} {}", keys.join(" ")));
            }
        }
        if !missing.is_empty() {
            bail!(
                "Secrets missing in {namespace}; make them, each value starting with a letter (NATS reads leading \
                 digits as a number), e.g. p$(openssl rand -hex 32):\n  {}",
                missing.join("\n  ")
            );
        }
        Ok(())
    }

    fn rollout(&self, namespace: &str, kind: &str, name: &str, timeout_s: u64) -> anyhow::Result<()> {
        let (target, timeout) = (format!("{kind}/{name}"), format!("--timeout={timeout_s}s"));
        let out = self.run(&["-n", namespace, "rollout", "status", &target, &timeout], None)?;
        if !out.status.success() {
            bail!(
                "{target} did not become ready within {timeout_s} s: {}\nSee `kubectl -n {namespace} describe {target}` \
                 and its pods' logs",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        eprintln!("  {target}: rolled out");
        Ok(())
    }

    /// Each workload's ready pods against the wanted.
    fn report(&self, namespace: &str, workloads: &[(String, String)]) -> anyhow::Result<()> {
        eprintln!("deployed to {namespace}:");
        for (kind, name) in workloads {
            let out = self.run(&["-n", namespace, "get", kind, name, "-o", "json"], None)?;
            let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let ready = status.pointer("/status/readyReplicas").and_then(Value::as_i64).unwrap_or(0);
            let wanted = status.pointer("/status/replicas").and_then(Value::as_i64).unwrap_or(0);
            eprintln!("  {kind}/{name}: {ready}/{wanted} ready");
        }
        Ok(())
    }
}

fn random_hex() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).expect("/dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(env: &str) -> Vec<Value> {
        objects(&render(env, "registry.example.com/moltbot", "1.2.3", None).unwrap()).unwrap()
    }

    fn find<'a>(objects: &'a mut [Value], kind: &str, name: &str) -> &'a mut Value {
        objects
            .iter_mut()
            .find(|o| {
                // Generated ConfigMaps carry a hash: moltbot-config-<hash>.
                let found = str_at(o, "/metadata/name");
                str_at(o, "/kind") == kind
                    && (found == name || found.strip_prefix(name).is_some_and(|h| h.starts_with('-')))
            })
            .unwrap_or_else(|| panic!("{kind} {name} is rendered"))
    }

    #[test]
    fn every_overlay_renders_objects_of_the_kubernetes_api_that_pass_the_reviewers_checks() {
        for env in environments().unwrap() {
            let objects = rendered(&env);
            let problems: Vec<String> = validate(&objects).into_iter().chain(policy(&objects)).collect();
            assert!(problems.is_empty(), "{env}: {problems:#?}");
            let images: BTreeSet<&str> = objects
                .iter()
                .filter_map(|o| o.pointer("/spec/template/spec/containers/0/image").and_then(Value::as_str))
                .collect();
            assert!(images.contains("registry.example.com/moltbot:1.2.3"), "{env}: {images:?}");
            let secrets = needed_secrets(&objects);
            for name in ["moltbot-api-keys", "moltbot-internal", "moltbot-redis", "moltbot-nats"] {
                assert!(secrets.contains_key(name), "{env}: {secrets:?}");
            }
        }
        let mut prod = rendered("prod");
        assert_eq!(find(&mut prod, "StatefulSet", "moltbot-nats").pointer("/spec/replicas"), Some(&3.into()));
        let cluster = find(&mut prod, "ConfigMap", "moltbot-nats-config").clone();
        assert!(str_at(&cluster, "/data/cluster.conf").contains("moltbot-nats-2.moltbot-nats-cluster:6222"));
        for kind in ["PodDisruptionBudget", "HorizontalPodAutoscaler", "ScaledObject"] {
            assert!(prod.iter().any(|o| str_at(o, "/kind") == kind), "prod has a {kind}");
        }
        let mut dev = rendered("dev");
        assert_eq!(find(&mut dev, "Deployment", "moltbot-inference-worker").pointer("/spec/replicas"), Some(&1.into()));
        // prod-gpu: prod, with the workers on the CUDA image, a GPU each and every layer on it.
        let mut gpu = rendered("prod-gpu");
        assert_eq!(gpu.len(), prod.len());
        let worker = find(&mut gpu, "Deployment", "moltbot-inference-worker");
        let container = &worker["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(str_at(container, "/image"), "registry.example.com/moltbot-cuda:1.2.3");
        assert_eq!(container.pointer("/resources/limits/nvidia.com~1gpu"), Some(&1.into()), "{container:#}");
        let env = container["env"].as_array().unwrap();
        assert!(env.iter().any(|e| e["name"] == "MOLTBOT_MODEL_PROVIDER__GPU_LAYERS" && e["value"] == "999"));
        assert_eq!(
            str_at(find(&mut gpu, "Deployment", "moltbot-gateway"), "/spec/template/spec/containers/0/image"),
            "registry.example.com/moltbot:1.2.3"
        );
    }

    #[test]
    fn a_misspelt_field_a_root_pod_a_missing_limit_and_an_unguarded_service_are_each_caught() {
        let mut objects = rendered("prod");
        let worker = find(&mut objects, "Deployment", "moltbot-inference-worker");
        let probe =
            worker["spec"]["template"]["spec"]["containers"][0].as_object_mut().unwrap().remove("readinessProbe");
        worker["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = probe.unwrap();
        worker["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = 0.into();
        let container = &mut worker["spec"]["template"]["spec"]["containers"][0];
        container["resources"]["limits"].as_object_mut().unwrap().remove("memory");
        container["image"] = "registry.example.com/moltbot:latest".into();
        worker["spec"]["replicas"] = 3.into();
        objects.retain(|o| !(str_at(o, "/kind") == "NetworkPolicy" && str_at(o, "/metadata/name") == "moltbot-redis"));
        let problems: Vec<String> = validate(&objects).into_iter().chain(policy(&objects)).collect();
        let text = problems.join("\n");
        for expected in [
            "containers[0].readinesProbe",
            "runAsNonRoot: true and a non-zero runAsUser",
            "needs cpu and memory limits",
            "must name a version, not latest",
            "autoscaled, so it must not set replicas",
            "Service moltbot-redis: no NetworkPolicy of its own",
            "needs a readiness and a liveness probe",
        ] {
            assert!(text.contains(expected), "expected {expected:?} among:\n{text}");
        }
    }

    #[test]
    fn a_deployed_config_that_listens_on_loopback_or_a_wrong_keda_consumer_is_caught() {
        let mut objects = rendered("prod");
        let config = find(&mut objects, "ConfigMap", "moltbot-config");
        let text = str_at(config, "/data/config.yaml").replace("0.0.0.0:50052", "127.0.0.1:50052");
        config["data"]["config.yaml"] = text.replace("model_name: smollm2-135m-instruct", "model_name: other").into();
        let text = policy(&objects).join("\n");
        assert!(text.contains("session_store.listen is 127.0.0.1:50052"), "{text}");
        assert!(text.contains("the workers of other pull from workers-other"), "{text}");
    }

    #[test]
    fn deploying_without_a_cluster_says_which_context_and_how_to_point_kubectl_at_one() {
        let dir = tempfile_dir();
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n\
             contexts: [{name: nowhere, context: {cluster: c, user: u}}]\ncurrent-context: nowhere\nusers: [{name: u, user: {}}]\n",
        )
        .unwrap();
        let err = Kubectl { kubeconfig: Some(kubeconfig) }.reachable().unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(err.contains("no Kubernetes cluster answers kubectl (context: nowhere)"), "{err}");
        assert!(err.contains("--dry-run"), "{err}");
    }

    #[test]
    fn a_dry_run_needs_no_cluster_and_an_unknown_environment_is_named() {
        main(&["dev".into(), "--dry-run".into(), "--tag".into(), "t".into()]).unwrap();
        let err = main(&["staging".into(), "--dry-run".into()]).unwrap_err().to_string();
        assert!(err.contains("no environment `staging`") && err.contains("dev, prod"), "{err}");
    }

    #[test]
    fn each_overlays_nats_config_is_one_the_deployed_nats_server_accepts() {
        let nats = crate::nats_server().unwrap();
        for env in environments().unwrap() {
            let mut objects = rendered(&env);
            let files = find(&mut objects, "ConfigMap", "moltbot-nats-config").clone();
            let server = find(&mut objects, "StatefulSet", "moltbot-nats").clone();
            let dir = tempfile_dir();
            for (name, text) in files["data"].as_object().unwrap() {
                std::fs::write(dir.join(name), text.as_str().unwrap()).unwrap();
            }
            let store = server["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == "NATS_MAX_FILE_STORE")
                .and_then(|e| e["value"].as_str())
                .expect("the StatefulSet sizes JetStream's store")
                .to_owned();
            let out = Command::new(&nats)
                .args(["-c", "nats.conf", "-t", "--server_name", "moltbot-nats-0"])
                .current_dir(&dir)
                .env("NATS_MAX_FILE_STORE", &store)
                .env("MOLTBOT_NATS_DIALOGUE_MANAGER_PASSWORD", format!("p{}", random_hex()))
                .env("MOLTBOT_NATS_WORKER_PASSWORD", format!("p{}", random_hex()))
                .output()
                .unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success() && said.contains("is valid"), "{env}: {said}");
        }
    }

    /// A directory of this test's own (tests run at once).
    fn tempfile_dir() -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("xtask-deploy-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_cuda_images_entry_point_names_a_missing_driver_and_runs_the_worker_where_one_is() {
        let dir = std::env::temp_dir().join(format!("moltbot-cuda-entry-{}", std::process::id()));
        let (lib, bin) = (dir.join("lib"), dir.join("bin"));
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        // A stand-in for the driver (a library named libcuda.so.1) and a worker linked to it, as the CUDA build is.
        std::fs::write(dir.join("cuda.c"), "int cuInit(unsigned flags) { return (int)flags; }\n").unwrap();
        let worker = "#include <stdio.h>\nint cuInit(unsigned);\n\
                      int main(int c, char **v) { for (int i = 1; i < c; i++) puts(v[i]); return cuInit(0); }\n";
        std::fs::write(dir.join("worker.c"), worker).unwrap();
        let gcc = |args: &[&str]| {
            let out = Command::new("cc").args(args).current_dir(&dir).output().expect("cc runs");
            assert!(out.status.success(), "cc {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        gcc(&["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", "lib/libcuda.so.1", "cuda.c"]);
        std::os::unix::fs::symlink("libcuda.so.1", lib.join("libcuda.so")).unwrap();
        gcc(&["-o", "bin/moltbot-inference-worker.bin", "worker.c", "-Llib", "-lcuda"]);
        let entry = bin.join("moltbot-inference-worker");
        std::fs::copy(crate::root().join("deploy/cuda-worker.sh"), &entry).unwrap();
        // No driver in the container: a clear error, not the loader's (not where this machine has one).
        let ldconfig = Command::new("ldconfig").arg("-p").output().map(|o| o.stdout).unwrap_or_default();
        let driver_here = String::from_utf8_lossy(&ldconfig).contains("libcuda.so.1");
        let out = Command::new(&entry).args(["--config", "c.yaml"]).env_remove("LD_LIBRARY_PATH").output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(if driver_here { 0 } else { 1 }), "{said}");
        let named =
            ["NVIDIA driver (libcuda.so.1) is not in this container", "--gpus all", "nvidia.com/gpu", "gpu_layers: 0"];
        for what in named.iter().filter(|_| !driver_here) {
            assert!(said.contains(what), "`{what}` is not said: {said}");
        }
        // With the driver: the worker itself, with its arguments.
        let out = Command::new(&entry).args(["--config", "c.yaml"]).env("LD_LIBRARY_PATH", &lib).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "--config\nc.yaml\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
