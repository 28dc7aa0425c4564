//! Pure planning: which resources may be deleted together, and in which order.
//!
//! Two rules make "x must be gone before y": the kind of y lists the kind of x
//! in `after`, or x names y as its `parent`. A kind rule is one edge per
//! resource, through a node that stands for "every resource of kind K is
//! gone": a resource of K points at K's node, K's node at each resource whose
//! kind is `after` K. So an event listing thousands of servers and VNIs costs
//! thousands of edges, not millions. No I/O; a cycle is an error naming the
//! resources on it.
//!
//! [`Graph::walk`] is how a job goes through the graph: a resource may start
//! as soon as everything it waits for is gone, and a failure holds back only
//! what waits for it. [`levels`] is the same graph as longest-path layers, for
//! showing a plan to people.

use std::collections::HashMap;

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

/// The order of one job's resources. Nodes `0..n` are the resources; nodes
/// from `n` on stand for "every resource of this kind is gone".
#[derive(Debug, Clone)]
pub struct Graph {
    n: usize,
    /// What becomes possible when a node is done.
    next: Vec<Vec<usize>>,
    /// What each node waits for.
    prev: Vec<Vec<usize>>,
    /// Resource index → its level (longest path from a resource that waits for nothing).
    level: Vec<usize>,
}

/// The kinds' order, all the planner knows of the configuration: which kinds
/// must be gone before a resource of `kind` is deleted (`None`: the kind is
/// not configured). `catalog::Catalog` is the one the worker uses.
pub trait KindOrder {
    fn after(&self, kind: &str) -> Option<&[String]>;
}

impl Graph {
    pub fn build<O: KindOrder + ?Sized>(resources: &[Resource], order: &O) -> Result<Graph, PlanError> {
        let n = resources.len();
        let index: HashMap<(&str, &str), usize> =
            resources.iter().enumerate().map(|(i, r)| ((r.kind.as_str(), r.id.as_str()), i)).collect();
        // One node per kind that some resource here must wait for.
        let mut kind_node: HashMap<&str, usize> = HashMap::new();
        let mut next: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut prev: Vec<Vec<usize>> = vec![Vec::new(); n];
        let present: std::collections::HashSet<&str> = resources.iter().map(|r| r.kind.as_str()).collect();
        for (y, r) in resources.iter().enumerate() {
            let after = order.after(&r.kind).ok_or_else(|| PlanError::UnknownKind(r.reference()))?;
            for k in after.iter().filter(|k| present.contains(k.as_str())) {
                let node = *kind_node.entry(k.as_str()).or_insert_with(|| {
                    next.push(Vec::new());
                    prev.push(Vec::new());
                    next.len() - 1
                });
                next[node].push(y);
                prev[y].push(node);
            }
            if let Some(p) = &r.parent {
                if let Some(&parent) = index.get(&(p.kind.as_str(), p.id.as_str())) {
                    next[y].push(parent);
                    prev[parent].push(y);
                }
            }
        }
        for (x, r) in resources.iter().enumerate() {
            if let Some(&node) = kind_node.get(r.kind.as_str()) {
                next[x].push(node);
                prev[node].push(x);
            }
        }
        let mut g = Graph { n, next, prev, level: vec![0; n] };
        g.level = g.layer(resources)?;
        Ok(g)
    }

    /// Kahn's algorithm over all nodes: each resource's level, or the cycle.
    fn layer(&self, resources: &[Resource]) -> Result<Vec<usize>, PlanError> {
        let total = self.next.len();
        let mut waiting: Vec<usize> = self.prev.iter().map(Vec::len).collect();
        let mut depth = vec![0usize; total];
        let mut queue: Vec<usize> = (0..total).filter(|&i| waiting[i] == 0).collect();
        let mut placed = 0;
        while let Some(x) = queue.pop() {
            placed += 1;
            for &y in &self.next[x] {
                // Into a resource: one level later. Into a kind node: the
                // highest level among the kind's resources.
                let d = depth[x] + usize::from(y < self.n);
                depth[y] = depth[y].max(d);
                waiting[y] -= 1;
                if waiting[y] == 0 {
                    queue.push(y);
                }
            }
        }
        if placed < total {
            return Err(PlanError::Cycle(self.describe_cycle(resources, &waiting)));
        }
        Ok(depth[..self.n].to_vec())
    }

    /// Walks backwards from a resource still waiting until one repeats.
    fn describe_cycle(&self, resources: &[Resource], waiting: &[usize]) -> String {
        let name = |i: usize| resources[i].reference().to_string();
        let Some(start) = (0..self.n).find(|&i| waiting[i] > 0) else {
            return String::new();
        };
        let mut path = vec![start];
        let mut at = start;
        while let Some(&p) = self.prev[at].iter().find(|&&x| waiting[x] > 0) {
            if let Some(pos) = path.iter().position(|&q| q == p) {
                let mut cycle: Vec<String> =
                    path[pos..].iter().rev().filter(|&&i| i < self.n).map(|&i| name(i)).collect();
                if let Some(first) = cycle.first().cloned() {
                    cycle.push(first);
                }
                return cycle.join(" -> ");
            }
            path.push(p);
            at = p;
        }
        path.iter().filter(|&&i| i < self.n).map(|&i| name(i)).collect::<Vec<_>>().join(" -> ")
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Resource `i`'s level: 0 waits for nothing, n waits for something at n - 1.
    pub fn level(&self, i: usize) -> usize {
        self.level[i]
    }

    /// The resources `i` waits for directly (through its kind's `after` or a parent link).
    pub fn waits_for(&self, i: usize) -> Vec<usize> {
        let mut out = Vec::new();
        for &p in &self.prev[i] {
            if p < self.n {
                out.push(p);
            } else {
                out.extend(self.prev[p].iter().copied());
            }
        }
        out
    }

    /// A fresh walk through the graph: nothing done yet.
    pub fn walk(&self) -> Walk<'_> {
        Walk { graph: self, waiting: self.prev.iter().map(Vec::len).collect() }
    }
}

/// One pass through a [`Graph`]: tell it what is gone, it says what may start.
/// A resource that is not reported gone (it failed) keeps everything that
/// waits for it, and only that, from ever starting.
pub struct Walk<'g> {
    graph: &'g Graph,
    waiting: Vec<usize>,
}

impl Walk<'_> {
    /// The resources that wait for nothing.
    pub fn start(&mut self) -> Vec<usize> {
        let roots: Vec<usize> = (0..self.waiting.len()).filter(|&i| self.waiting[i] == 0).collect();
        let mut ready = Vec::new();
        for i in roots {
            if i < self.graph.n {
                ready.push(i);
            } else {
                self.release(i, &mut ready);
            }
        }
        ready
    }

    /// Resource `i` is gone: the resources that may start now.
    pub fn gone(&mut self, i: usize) -> Vec<usize> {
        let mut ready = Vec::new();
        self.release(i, &mut ready);
        ready
    }

    fn release(&mut self, x: usize, ready: &mut Vec<usize>) {
        for &y in &self.graph.next[x] {
            self.waiting[y] -= 1;
            if self.waiting[y] == 0 {
                if y < self.graph.n {
                    ready.push(y);
                } else {
                    self.release(y, ready);
                }
            }
        }
    }
}

/// The resources as longest-path layers: level 0 needs nothing gone first,
/// level n waits for something at level n - 1. For showing a plan.
pub fn levels<O: KindOrder + ?Sized>(resources: &[Resource], order: &O) -> Result<Levels, PlanError> {
    let g = Graph::build(resources, order)?;
    let mut out: Levels = Vec::new();
    for i in 0..g.len() {
        let l = g.level(i);
        if out.len() <= l {
            out.resize(l + 1, Vec::new());
        }
        out[l].push(i);
    }
    for level in &mut out {
        level.sort_by(|&a, &b| resources[a].reference().cmp(&resources[b].reference()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn catalog() -> crate::catalog::Catalog {
        crate::catalog::validate(&Settings::from_toml(include_str!("../config/vpc-node.toml")).unwrap()).unwrap()
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
    fn a_failure_holds_back_only_what_waits_for_it() {
        // The VNI fails: the server (after vni) never starts; the IP
        // reservations wait only for the DNS record and go.
        let res = vec![r("vni", "v"), r("dns_record", "d"), r("ip_reservation", "ip"), r("bare_metal_server", "s")];
        let g = Graph::build(&res, &catalog()).unwrap();
        let mut w = g.walk();
        let mut ready = w.start();
        ready.sort();
        assert_eq!(ready, vec![0, 1], "the VNI and the DNS record wait for nothing");
        assert_eq!(w.gone(1), vec![2], "the DNS record gone, the reservation may go");
        assert_eq!(w.gone(2), Vec::<usize>::new(), "the server still waits for the VNI");
        let mut waits = g.waits_for(3);
        waits.sort();
        assert_eq!(waits, vec![0, 1], "the server waits for the VNI and the DNS record, not the reservation");
    }

    #[test]
    fn a_kind_order_costs_one_edge_per_resource() {
        let mut res: Vec<Resource> = (0..3000).map(|i| r("bare_metal_server", &format!("s{i}"))).collect();
        res.extend((0..3000).map(|i| r("vni", &format!("v{i}"))));
        let g = Graph::build(&res, &catalog()).unwrap();
        let edges: usize = g.next.iter().map(Vec::len).sum();
        assert!(edges <= 2 * res.len(), "{edges} edges for {} resources", res.len());
        assert_eq!(levels(&res, &catalog()).unwrap().len(), 2);
    }

    #[test]
    fn nothing_to_do_is_no_levels() {
        assert!(levels(&[], &catalog()).unwrap().is_empty());
    }
}
