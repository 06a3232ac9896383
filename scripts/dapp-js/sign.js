// node sign.js < jobs.json: signs each job's request with openlora.js and, when a job carries a receipt,
// verifies it. A job: {privateKey, payer?, info (GET /v1/attribution), body, fields, receipt?, text?}.
// Prints a JSON list: {promptHash, digest, signature, headers, problems?} per job.
import { privateKeyToAccount } from 'viem/accounts';
import { signRequest, verifyReceipt } from './openlora.js';

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const results = [];
for (const job of JSON.parse(Buffer.concat(chunks).toString('utf8'))) {
  const account = privateKeyToAccount(job.privateKey);
  const signed = await signRequest({ ...job, account, payer: job.payer ?? account.address });
  const result = { promptHash: signed.request.promptHash, digest: signed.digest, signature: signed.signature,
                   headers: signed.headers };
  if (job.receipt) result.problems = await verifyReceipt({ ...job, signed });
  results.push(result);
}
process.stdout.write(JSON.stringify(results));
