#!/usr/bin/env node
// Compiles contracts/src with the pinned solc-js through its Node API (the `solcjs --standard-json` CLI
// prints a stray line before the JSON) and writes one artifact per contract (ABI + creation bytecode)
// under contracts/artifacts, which the Python side loads, plus a manifest of what they were built from.
//
//   node build.js           compile and write the artifacts
//   node build.js --check   fail (exit 1) if the artifacts are stale: the sources, settings or compiler
//                           differ from the manifest's input hash, or an artifact was edited by hand
//   node build.js --check --full   also recompile and compare byte for byte
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const solc = require('solc');

const ROOT = __dirname;
const SRC = path.join(ROOT, 'src');
const OUT = path.join(ROOT, 'artifacts');
const NODE_MODULES = path.join(ROOT, 'node_modules');

// Pinned: the artifacts must be reproducible from the sources. cancun: transient storage (OpenZeppelin's
// ReentrancyGuardTransient) and mcopy; every current L1/L2 supports it.
const SETTINGS = {
  evmVersion: 'cancun',
  optimizer: { enabled: true, runs: 200 }, // 200: UsageSettlement must fit EIP-170's 24,576-byte code limit
  viaIR: false,
  metadata: { bytecodeHash: 'none' },
  outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object'] } },
};

function listSources(dir) {
  const found = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) found.push(...listSources(full));
    else if (entry.name.endsWith('.sol')) found.push(full);
  }
  return found;
}

function readInput() {
  const sources = {};
  for (const file of listSources(SRC)) {
    sources[path.relative(ROOT, file).split(path.sep).join('/')] = { content: fs.readFileSync(file, 'utf8') };
  }
  return { language: 'Solidity', sources, settings: SETTINGS };
}

// Imports resolve inside node_modules (@openzeppelin/contracts/...).
function findImports(importPath) {
  const file = path.join(NODE_MODULES, importPath);
  if (!fs.existsSync(file)) return { error: `not found: ${importPath}` };
  return { contents: fs.readFileSync(file, 'utf8') };
}

function sha256(text) {
  return crypto.createHash('sha256').update(text).digest('hex');
}

function inputHash(input) {
  const ozVersion = require(path.join(NODE_MODULES, '@openzeppelin/contracts/package.json')).version;
  return sha256(JSON.stringify({ solc: solc.version(), openzeppelin: ozVersion, input }));
}

function compile(input) {
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
  const errors = (output.errors || []).filter((e) => e.severity === 'error');
  for (const e of output.errors || []) process.stderr.write(e.formattedMessage + '\n');
  if (errors.length > 0) throw new Error(`${errors.length} compilation error(s)`);
  const artifacts = {};
  for (const [sourceName, contracts] of Object.entries(output.contracts)) {
    if (!sourceName.startsWith('src/')) continue;
    for (const [contractName, compiled] of Object.entries(contracts)) {
      // Interfaces have no code; internal-only libraries (UsageTypes) have no ABI.
      if (!compiled.evm.bytecode.object || compiled.abi.length === 0) continue;
      const artifact = {
        contractName,
        sourceName,
        abi: compiled.abi,
        bytecode: '0x' + compiled.evm.bytecode.object,
      };
      artifacts[`${contractName}.json`] = JSON.stringify(artifact, null, 1) + '\n';
    }
  }
  return artifacts;
}

function manifestFor(input, artifacts) {
  const files = {};
  for (const name of Object.keys(artifacts).sort()) files[name] = sha256(artifacts[name]);
  return JSON.stringify({ solc: solc.version(), settings: SETTINGS, inputHash: inputHash(input), artifacts: files }, null, 1) + '\n';
}

function check(full) {
  const input = readInput();
  const manifestPath = path.join(OUT, 'manifest.json');
  const problems = [];
  if (!fs.existsSync(manifestPath)) {
    problems.push('artifacts/manifest.json is missing');
  } else {
    const manifest = JSON.parse(fs.readFileSync(manifestPath, 'utf8'));
    if (manifest.inputHash !== inputHash(input)) problems.push('sources, settings or compiler changed since the last build');
    for (const [name, digest] of Object.entries(manifest.artifacts)) {
      const file = path.join(OUT, name);
      if (!fs.existsSync(file)) problems.push(`${name} is missing`);
      else if (sha256(fs.readFileSync(file, 'utf8')) !== digest) problems.push(`${name} was modified`);
    }
    if (full && problems.length === 0) {
      const artifacts = compile(input);
      for (const [name, text] of Object.entries(artifacts)) {
        const file = path.join(OUT, name);
        if (!fs.existsSync(file) || fs.readFileSync(file, 'utf8') !== text) problems.push(`${name} differs from a fresh build`);
      }
    }
  }
  if (problems.length > 0) {
    for (const p of problems) process.stderr.write(`stale contract artifacts: ${p}\n`);
    process.stderr.write('run: node contracts/build.js\n');
    process.exit(1);
  }
  process.stdout.write('contract artifacts are up to date\n');
}

function build() {
  const input = readInput();
  const artifacts = compile(input);
  fs.rmSync(OUT, { recursive: true, force: true });
  fs.mkdirSync(OUT, { recursive: true });
  for (const [name, text] of Object.entries(artifacts)) fs.writeFileSync(path.join(OUT, name), text);
  fs.writeFileSync(path.join(OUT, 'manifest.json'), manifestFor(input, artifacts));
  process.stdout.write(`compiled ${Object.keys(artifacts).length} contracts with solc ${solc.version()}\n`);
}

const args = process.argv.slice(2);
if (args.includes('--check')) check(args.includes('--full'));
else build();
