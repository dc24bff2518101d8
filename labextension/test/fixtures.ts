import { IEnvironment } from '../src/request';

/** An environment as the server describes it, with `fields` changed. */
export function env(
  name: string,
  fields: Partial<IEnvironment> = {}
): IEnvironment {
  return {
    name,
    display_name: `Python (${name})`,
    language: 'python',
    archive: `/apps/envs/${name}.tar.zst`,
    archive_size: 80_000_000,
    format: 'tar.zst',
    python_version: '3.11.9',
    packages: 12,
    pip_packages: 30,
    staged: null,
    staging: null,
    last_failure: null,
    problems: [],
    ...fields
  };
}

export const staged = {
  prefix: '/tmp/kernelprov-u/abc',
  bytes: 190_000_000,
  staged_at: 1000,
  last_used: 1000,
  used: false,
  in_use: 0
};
