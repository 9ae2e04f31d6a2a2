-- Tasks (issue 5): a result callback is owed from the moment a task with a callback_url reaches a
-- terminal status (set in the same UPDATE) until it is delivered or its retries run out, so a stop or
-- crash between the two resends it at the next start instead of losing it.
ALTER TABLE tasks ADD COLUMN callback_due INTEGER NOT NULL DEFAULT 0;
CREATE INDEX tasks_callback_due ON tasks (callback_due) WHERE callback_due = 1;
