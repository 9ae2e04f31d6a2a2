//! Which pending task runs next: priority, then FIFO, with smart scheduling inside the top priority.

use crate::db::TaskRecord;

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub smart: bool,
    /// A task of the top priority is taken regardless once it has waited this long.
    pub max_reorder_wait_ms: i64,
}

/// Index into `pending` (already in priority desc, seq asc order) of the task to run next.
///
/// Smart scheduling: among the tasks of the top priority, prefer one that uses the loaded checkpoint
/// and LoRA set, then one that uses the loaded checkpoint with other LoRAs (re-applying LoRAs costs
/// far less than loading a checkpoint), so a mixed A,B,A,B workload does not reload on every task.
/// A task that has waited `max_reorder_wait_ms` or longer is never passed over, so reordering
/// cannot starve anything.
pub fn pick(
    pending: &[TaskRecord],
    loaded: Option<(&str, &str)>,
    now_ms: i64,
    policy: Policy,
) -> Option<usize> {
    let head = pending.first()?;
    if !policy.smart {
        return Some(0);
    }
    let top: Vec<usize> = (0..pending.len())
        .take_while(|&i| pending[i].priority == head.priority)
        .collect();
    if let Some(&overdue) = top
        .iter()
        .find(|&&i| now_ms - pending[i].created_at >= policy.max_reorder_wait_ms)
    {
        return Some(overdue);
    }
    if let Some((model, loras)) = loaded {
        let same_model = |i: &&usize| pending[**i].model_sha256.as_deref() == Some(model);
        if let Some(&i) = top
            .iter()
            .filter(same_model)
            .find(|&&i| pending[i].lora_key == loras)
            .or_else(|| top.iter().find(same_model))
        {
            return Some(i);
        }
    }
    Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::TaskStatus;

    fn t(id: &str, model: &str, priority: i64, created_at: i64) -> TaskRecord {
        TaskRecord {
            id: id.into(),
            seq: 0,
            status: TaskStatus::Pending,
            priority,
            model_sha256: Some(model.into()),
            lora_key: String::new(),
            params: serde_json::Value::Null,
            callback_url: None,
            attempts: 0,
            error_message: None,
            images: vec![],
            created_at,
            started_at: None,
            updated_at: created_at,
            finished_at: None,
        }
    }

    const SMART: Policy = Policy {
        smart: true,
        max_reorder_wait_ms: 1000,
    };

    /// Runs the whole queue, counting checkpoint switches.
    fn drain(mut q: Vec<TaskRecord>, policy: Policy) -> (Vec<String>, usize) {
        let mut loaded: Option<String> = None;
        let (mut order, mut loads) = (vec![], 0);
        while let Some(i) = pick(&q, loaded.as_deref().map(|m| (m, "")), 10, policy) {
            let task = q.remove(i);
            if loaded.as_deref() != task.model_sha256.as_deref() {
                loads += 1;
                loaded = task.model_sha256.clone();
            }
            order.push(task.id);
        }
        (order, loads)
    }

    #[test]
    fn the_loaded_lora_set_goes_first_then_the_loaded_checkpoint() {
        let with = |id: &str, model: &str, loras: &str| TaskRecord {
            lora_key: loras.into(),
            ..t(id, model, 0, 0)
        };
        let q = vec![
            with("b", "B", ""),
            with("a-x", "A", "x:1"),
            with("a-y", "A", "y:0.5"),
            with("a", "A", ""),
        ];
        // A with LoRA y loaded: the exact match first.
        assert_eq!(pick(&q, Some(("A", "y:0.5")), 10, SMART), Some(2));
        // A with no LoRA loaded: the plain A task, not an A task that needs LoRAs.
        assert_eq!(pick(&q, Some(("A", "")), 10, SMART), Some(3));
        // A with LoRA z loaded (no exact match): still A, only the LoRAs change.
        assert_eq!(pick(&q, Some(("A", "z:1")), 10, SMART), Some(1));
        // C loaded: nothing matches, FIFO.
        assert_eq!(pick(&q, Some(("C", "")), 10, SMART), Some(0));
    }

    #[test]
    fn smart_scheduling_groups_by_loaded_model() {
        let q = vec![
            t("1", "A", 0, 0),
            t("2", "B", 0, 1),
            t("3", "A", 0, 2),
            t("4", "B", 0, 3),
            t("5", "A", 0, 4),
        ];
        let (order, loads) = drain(q.clone(), SMART);
        assert_eq!(order, ["1", "3", "5", "2", "4"]);
        assert_eq!(loads, 2);
        let (fifo, fifo_loads) = drain(
            q,
            Policy {
                smart: false,
                ..SMART
            },
        );
        assert_eq!(fifo, ["1", "2", "3", "4", "5"]);
        assert_eq!(fifo_loads, 5);
    }

    #[test]
    fn priority_beats_the_loaded_model_and_overdue_tasks_are_not_passed_over() {
        let q = vec![t("hi", "B", 5, 0), t("lo", "A", 0, 0)];
        assert_eq!(pick(&q, Some(("A", "")), 10, SMART), Some(0));
        // B has waited past the bound: taken even though A is loaded.
        let q = vec![t("old-b", "B", 0, 0), t("new-a", "A", 0, 5000)];
        assert_eq!(pick(&q, Some(("A", "")), 5000, SMART), Some(0));
        assert_eq!(pick(&q, Some(("A", "")), 500, SMART), Some(1));
        assert_eq!(pick(&[], None, 0, SMART), None);
    }
}
