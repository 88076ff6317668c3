// k6: latency of single-event requests at a fixed arrival rate (default 10 k req/s for 20 s)
// against the ingest edge. Every request has a unique event id. Targets 127.0.0.1 only.
//   k6 run -e KEY=mk_... -e RATE=10000 -e URL=http://127.0.0.1:8080 loadtest/ingest-latency.js
import http from 'k6/http';
import { check } from 'k6';

const RATE = parseInt(__ENV.RATE || '10000');
export const options = {
  discardResponseBodies: true,
  scenarios: {
    fixed_rate: {
      executor: 'constant-arrival-rate',
      rate: RATE, timeUnit: '1s', duration: __ENV.DURATION || '20s',
      preAllocatedVUs: 64, maxVUs: 256,
    },
  },
  summaryTrendStats: ['p(50)', 'p(99)', 'max'],
  thresholds: { checks: ['rate==1'] },
};

const url = (__ENV.URL || 'http://127.0.0.1:8080') + '/api/v1/events';
const params = { headers: { 'Content-Type': 'application/cloudevents+json', Authorization: `Bearer ${__ENV.KEY}` } };

export default function () {
  const ev = {
    specversion: '1.0', id: `${__VU}-${__ITER}-${Date.now()}`, source: 'k6', type: 'llm.tokens',
    subject: `customer-${__ITER % 50}`, time: new Date().toISOString(),
    data: { model: 'gpt-small', input_tokens: 120, output_tokens: 30 },
  };
  const r = http.post(url, JSON.stringify(ev), params);
  check(r, { '204': (x) => x.status === 204 });
}
