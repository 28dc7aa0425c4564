//! Pure planning: which resources may be deleted together, and in which order.
//!
//! Two rules make an edge "x must be gone before y": the kind of y lists the kind
//! of x in `after`, or x names y as its `parent`. Levels are the longest-path
//! layering of that graph: level 0 needs nothing gone first, level n waits for
//! everything before it. No I/O; a cycle is an error naming the resources on it.

use std::collections::HashMap;

use crate::config::Catalog;
use crate::domain::{Resource, ResourceRef};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("resources form a cycle through their parent links: {0}")]
    Cycle(String),
    #[error("{0} has kind that is not configured")]
    UnknownKind(ResourceRef),
}

/// Indices into the resource slice, grouped by level, each level sorted for
/// stable output.
pub type Levels = Vec<Vec<usize>>;

pub fn levels(resources: &[Resource], catalog: &Catalog) -> Result<Levels, PlanError> {
    let n = resources.len();
    let index: HashMap<(&str, &str), usize> =
        resources.iter().enumerate().map(|(i, r)| ((r.kind.as_str(), r.id.as_str()), i)).collect();
    let mut by_kind: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, r) in resources.iter().enumerate() {
        by_kind.entry(r.kind.as_str()).or_default().push(i);
    }

    // before[y] = resources that must be gone before y.
    let mut before: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (y, r) in resources.iter().enumerate() {
        let spec = catalog.kind(&r.kind).ok_or_else(|| PlanError::UnknownKind(r.reference()))?;
        for k in &spec.after {
            if let Some(xs) = by_kind.get(k.as_str()) {
                before[y].extend(xs.iter().copied());
            }
        }
        if let Some(p) = &r.parent {
            if let Some(&parent) = index.get(&(p.kind.as_str(), p.id.as_str())) {
                before[parent].push(y);
            }
        }
    }

    // Kahn's algorithm, one wave per level.
    let mut waiting: Vec<usize> = before.iter().map(|b| b.len()).collect();
    let mut unblocks: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (y, xs) in before.iter().enumerate() {
        for &x in xs {
            unblocks[x].push(y);
        }
    }
    let mut current: Vec<usize> = (0..n).filter(|&i| waiting[i] == 0).collect();
    let mut out = Vec::new();
    let mut placed = 0;
    while !current.is_empty() {
        current.sort_by(|&a, &b| resources[a].reference().cmp(&resources[b].reference()));
        let mut next = Vec::new();
        for &x in &current {
            for &y in &unblocks[x] {
                waiting[y] -= 1;
                if waiting[y] == 0 {
                    next.push(y);
                }
            }
        }
        placed += current.len();
        out.push(std::mem::replace(&mut current, next));
    }
    if placed < n {
        return Err(PlanError::Cycle(describe_cycle(resources, &before, &waiting)));
    }
    Ok(out)
}

/// Walks backwards from a resource still waiting until one repeats.
fn describe_cycle(resources: &[Resource], before: &[Vec<usize>], waiting: &[usize]) -> String {
    let Some(start) = (0..resources.len()).find(|&i| waiting[i] > 0) else {
        return String::new();
    };
    let mut path = vec![start];
    let mut at = start;
    while let Some(&prev) = before[at].iter().find(|&&x| waiting[x] > 0) {
        if let Some(pos) = path.iter().position(|&p| p == prev) {
            let mut cycle: Vec<String> =
                path[pos..].iter().rev().map(|&i| resources[i].reference().to_string()).collect();
            cycle.push(resources[prev].reference().to_string());
            return cycle.join(" -> ");
        }
        path.push(prev);
        at = prev;
    }
    path.iter().map(|&i| resources[i].reference().to_string()).collect::<Vec<_>>().join(" -> ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn catalog() -> Catalog {
        Settings::from_toml(include_str!("../config/vpc-node.toml")).unwrap().validate().unwrap()
    }

    fn r(kind: &str, id: &str) -> Resource {
        Resource { kind: kind.into(), id: id.into(), attributes: Default::default(), parent: None }
    }

    fn names(res: &[Resource], levels: &Levels) -> Vec<Vec<String>> {
        levels.iter().map(|l| l.iter().map(|&i| res[i].reference().to_string()).collect()).collect()
    }

    #[test]
    fn the_vpc_node_goes_in_two_levels() {
        let res = vec![
            r("bare_metal_server", "s1"),
            r("ip_reservation", "ip1"),
            r("ip_reservation", "ip2"),
            r("dns_record", "d1"),
            r("vni", "v1"),
        ];
        let l = levels(&res, &catalog()).unwrap();
        assert_eq!(
            names(&res, &l),
            vec![
                vec!["dns_record/d1", "vni/v1"],
                vec!["bare_metal_server/s1", "ip_reservation/ip1", "ip_reservation/ip2"]
            ]
        );
    }

    #[test]
    fn a_parent_goes_after_its_child_even_of_the_same_kind() {
        let mut child = r("vni", "child");
        child.parent = Some(ResourceRef { kind: "vni".into(), id: "parent".into() });
        let res = vec![r("vni", "parent"), child];
        let l = levels(&res, &catalog()).unwrap();
        assert_eq!(names(&res, &l), vec![vec!["vni/child"], vec!["vni/parent"]]);
    }

    #[test]
    fn a_parent_outside_the_set_is_ignored() {
        let mut child = r("vni", "child");
        child.parent = Some(ResourceRef { kind: "bare_metal_server".into(), id: "elsewhere".into() });
        let l = levels(&[child.clone()], &catalog()).unwrap();
        assert_eq!(l, vec![vec![0]]);
    }

    #[test]
    fn a_parent_cycle_is_an_error_that_names_it() {
        let mut a = r("vni", "a");
        a.parent = Some(ResourceRef { kind: "vni".into(), id: "b".into() });
        let mut b = r("vni", "b");
        b.parent = Some(ResourceRef { kind: "vni".into(), id: "a".into() });
        let err = levels(&[a, b], &catalog()).unwrap_err();
        let PlanError::Cycle(text) = err else { panic!("expected a cycle") };
        assert!(text.contains("vni/a") && text.contains("vni/b"), "{text}");
    }

    #[test]
    fn a_parent_link_against_kind_order_is_a_cycle() {
        // The server must wait for the VNI by kind; a VNI whose parent link says the
        // server goes first contradicts that.
        let mut server = r("bare_metal_server", "s");
        server.parent = Some(ResourceRef { kind: "vni".into(), id: "v".into() });
        let err = levels(&[server, r("vni", "v")], &catalog()).unwrap_err();
        assert!(matches!(err, PlanError::Cycle(_)));
    }

    #[test]
    fn nothing_to_do_is_no_levels() {
        assert!(levels(&[], &catalog()).unwrap().is_empty());
    }
}
