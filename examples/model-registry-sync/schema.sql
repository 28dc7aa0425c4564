-- The backend's table, as the sync script read it (`SELECT id FROM models`).
CREATE TABLE models (
    id          text PRIMARY KEY,
    provider    text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO models (id, provider) VALUES
    ('granite-8b-code-instruct', 'vllm'),
    ('mistral-7b-instruct', 'vllm'),
    ('llama-13b', 'vllm'),
    ('old-model-1', 'vllm'),
    ('old-model-2', 'vllm');
