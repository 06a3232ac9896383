// How a JavaScript dApp pays an OpenLoRA node per request (docs/dapp.md): build the body, sign the
// InferenceRequest (EIP-712, viem), send it with two headers, check the node-signed usage record.
// tests/attribution/test_dapp_js.py runs this file under Node and checks that it produces the same
// prompt hash, digest and signature as the Python client (attribution/client.py) for the same key and body.
import canonicalize from 'canonicalize';
import { hashTypedData, keccak256, recoverTypedDataAddress, stringToBytes } from 'viem';

// Field order is part of the signed type: it must match attribution/types.py exactly.
export const types = {
  InferenceRequest: [
    { name: 'payer', type: 'address' },
    { name: 'node', type: 'address' },
    { name: 'adapterId', type: 'uint64' },
    { name: 'promptHash', type: 'bytes32' },
    { name: 'inputTokens', type: 'uint32' },
    { name: 'maxTokens', type: 'uint32' },
    { name: 'maxCharge', type: 'uint128' },
    { name: 'cumulativeCap', type: 'uint128' },
    { name: 'deadline', type: 'uint64' },
  ],
  UsageRecord: [
    { name: 'requestDigest', type: 'bytes32' },
    { name: 'termsVersion', type: 'uint32' },
    { name: 'outputTokens', type: 'uint32' },
    { name: 'adapterAmount', type: 'uint128' },
    { name: 'charge', type: 'uint128' },
    { name: 'responseHash', type: 'bytes32' },
    { name: 'servedAt', type: 'uint64' },
  ],
};

// GET /v1/attribution -> the EIP-712 domain every request and record is signed under.
export function domainOf(info) {
  return { name: 'OpenLoRA', version: '2', chainId: BigInt(info.chainId), verifyingContract: info.settlement };
}

// keccak256 of the RFC 8785 canonical JSON of the exact body that is POSTed.
export const promptHash = (body) => keccak256(stringToBytes(canonicalize(body)));

// keccak256 of the answer's UTF-8 bytes (chat: the assistant content; completions: the text).
export const responseHash = (text) => keccak256(stringToBytes(text));

// Wire form -> EIP-712 message: integers are decimal strings on the wire, bigints for viem.
const INTEGER = /^uint/;
function message(primaryType, wire) {
  return Object.fromEntries(types[primaryType].map(({ name, type }) =>
    [name, INTEGER.test(type) ? BigInt(wire[name]) : wire[name]]));
}

// Builds and signs a request for `body`. `account` is a viem account (privateKeyToAccount, or a wallet's);
// `fields` holds what the dApp decided: adapterId (from /v1/models), inputTokens (the base model's tokenizer
// and chat template, e.g. with transformers.js), maxTokens (= body.max_tokens), maxCharge, cumulativeCap
// (its running counter for this node) and deadline (unix seconds).
export async function signRequest({ account, payer = account.address, info, body, fields }) {
  const wire = {
    payer,
    node: info.node,
    adapterId: String(fields.adapterId),
    promptHash: promptHash(body),
    inputTokens: String(fields.inputTokens),
    maxTokens: String(fields.maxTokens),
    maxCharge: String(fields.maxCharge),
    cumulativeCap: String(fields.cumulativeCap),
    deadline: String(fields.deadline),
  };
  const typed = { domain: domainOf(info), types, primaryType: 'InferenceRequest', message: message('InferenceRequest', wire) };
  const signature = await account.signTypedData(typed);
  return {
    request: wire,
    digest: hashTypedData(typed),
    signature,
    headers: { 'X-OpenLoRA-Request': JSON.stringify(wire), 'X-OpenLoRA-Signature': signature },
  };
}

// Checks the `openlora` receipt of an answer; returns a list of problems (empty: the record is good).
export async function verifyReceipt({ receipt, signed, info, text }) {
  const problems = [];
  const domain = domainOf(info);
  const record = receipt.record;
  const req = signed.request;
  const same = (a, b) => String(a).toLowerCase() === String(b).toLowerCase(); // addresses may differ in case
  if (types.InferenceRequest.some(({ name }) => !same(receipt.request[name], req[name]))) {
    problems.push('the receipt echoes another request');
  }
  if (!same(record.requestDigest, signed.digest)) problems.push('requestDigest is not our request');
  const signer = await recoverTypedDataAddress({
    domain, types, primaryType: 'UsageRecord', message: message('UsageRecord', record), signature: receipt.signature,
  });
  if (!same(signer, info.signer)) problems.push(`record signed by ${signer}, not the node's signer`);
  if (BigInt(record.outputTokens) > BigInt(req.maxTokens)) problems.push('outputTokens over maxTokens');
  if (BigInt(record.charge) > BigInt(req.maxCharge)) problems.push('charge over maxCharge');
  if (!same(record.responseHash, responseHash(text))) problems.push('responseHash is not the text we got');
  return problems;
}
