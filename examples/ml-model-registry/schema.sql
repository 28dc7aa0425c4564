-- The platform's tables, reduced to what the cleanup reads (Django models of the report).
CREATE TABLE registered_model (
    id                          bigint PRIMARY KEY,
    model_name                  text NOT NULL UNIQUE,
    vertex_model_resource_name  text NOT NULL DEFAULT '',
    created_at                  timestamptz NOT NULL
);
CREATE TABLE training_schedule (
    id                   bigint PRIMARY KEY,
    registered_model_id  bigint NOT NULL REFERENCES registered_model (id) ON DELETE CASCADE
);
CREATE TABLE training_run (
    id                   bigint PRIMARY KEY,
    registered_model_id  bigint REFERENCES registered_model (id) ON DELETE SET NULL,
    status               text NOT NULL
);
CREATE TABLE deployed_endpoint (
    id               bigint PRIMARY KEY,
    vertex_model_id  text NOT NULL,
    is_active        boolean NOT NULL,
    model_deleted    boolean NOT NULL DEFAULT false
);

-- The audit of 2026-02-08: ten records, three of them orphans.
INSERT INTO registered_model VALUES
    (1,  'chern_retriv_v2',     'projects/b2b-recs/locations/europe-central2/models/5241525861236080640', now() - interval '60 days'),
    (2,  'chern_retriv_v5',     'projects/b2b-recs/locations/europe-central2/models/8920403806844354560', now() - interval '50 days'),
    (3,  'chern_rank_v1',       'projects/b2b-recs/locations/europe-central2/models/6812719181234962432', now() - interval '45 days'),
    (4,  'chern_hybrid_v1',     'projects/b2b-recs/locations/europe-central2/models/174413330490851328',  now() - interval '40 days'),
    (5,  'chern_hybrid_v2',     '',                                                                       now() - interval '30 days'),
    (6,  'chern_hybrid_v3',     'projects/b2b-recs/locations/europe-central2/models/7115797362408161280', now() - interval '20 days'),
    (7,  'short-test-20260129', '',                                                                       now() - interval '25 days'),
    (8,  'chern_rank_v3',       'projects/b2b-recs/locations/europe-central2/models/2864962264123834368', now() - interval '15 days'),
    (9,  'chern_rank_v4',       'projects/b2b-recs/locations/europe-central2/models/3326581225929310208', now() - interval '10 days'),
    (10, 'chern_retriv_v6',     'projects/b2b-recs/locations/europe-central2/models/7334503419312340992', now() - interval '5 days'),
    -- Not in the audit: a run that started two days ago, and one still running after ten.
    (11, 'chern_rank_v5',       '',                                                                       now() - interval '2 days'),
    (12, 'chern_retriv_v7',     '',                                                                       now() - interval '10 days');
INSERT INTO training_schedule VALUES (1, 5), (2, 5);
INSERT INTO training_run VALUES (100, 5, 'failed'), (101, 7, 'failed'), (102, 12, 'running'), (103, 9, 'completed');
-- One of the test models still serves traffic.
INSERT INTO deployed_endpoint VALUES (1, '4998894431311495168', true), (2, '3326581225929310208', true);
