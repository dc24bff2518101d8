import { Time } from '@jupyterlab/coreutils';
import { TranslationBundle } from '@jupyterlab/translation';
import { ReactWidget, UseSignal } from '@jupyterlab/ui-components';
import * as React from 'react';

import { EnvironmentsModel } from './model';
import { IEnvironment } from './request';

/** Above this many environments the panel shows a filter box. */
export const FILTER_THRESHOLD = 6;

/** What a row's buttons do; provided by the plugin (documents, dialogs). */
export interface IEnvironmentActions {
  openNotebook(env: IEnvironment): void;
  stage(env: IEnvironment): void;
  evict(env: IEnvironment): void;
}

/** Sizes in decimal units, like the `kernelprov` CLI. */
export function formatBytes(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined) {
    return '—';
  }
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value >= 100 || unit === 0 ? value.toFixed(0) : value.toFixed(1)} ${units[unit]}`;
}

type State =
  'problem' | 'failed' | 'staging' | 'evicting' | 'ready' | 'not-staged';

function stateOf(
  env: IEnvironment,
  busyWith?: EnvironmentsModel.Action
): State {
  if (env.staged && busyWith === 'evict') {
    return 'evicting';
  }
  if (env.staged) {
    return 'ready';
  }
  if (env.staging) {
    return env.staging.error ? 'failed' : 'staging';
  }
  return env.problems.length ? 'problem' : 'not-staged';
}

function StateCell(props: {
  env: IEnvironment;
  state: State;
  trans: TranslationBundle;
}): JSX.Element {
  const { env, state, trans } = props;
  let label: string;
  let bar: JSX.Element | null = null;
  switch (state) {
    case 'ready':
      label = trans.__('ready');
      break;
    case 'evicting':
      label = trans.__('evicting…');
      break;
    case 'failed':
      label = trans.__('failed');
      break;
    case 'problem':
      label = trans.__('unavailable');
      break;
    case 'staging': {
      const fraction = env.staging?.fraction;
      if (fraction === null || fraction === undefined) {
        label = trans.__('staging…');
        bar = <progress aria-hidden="true" />;
      } else {
        const percent = Math.floor(fraction * 100);
        label = trans.__('staging %1 %', percent);
        bar = <progress aria-hidden="true" max={100} value={percent} />;
      }
      break;
    }
    default:
      label = trans.__('not staged');
  }
  return (
    <td
      className={`jp-kernelprov-state jp-kernelprov-mod-${state}`}
      aria-live="polite"
    >
      <span className="jp-kernelprov-stateLabel">{label}</span>
      {bar}
    </td>
  );
}

function Details(props: {
  env: IEnvironment;
  trans: TranslationBundle;
}): JSX.Element {
  const { env, trans } = props;
  const lines: JSX.Element[] = [];
  // The Python and package columns give way in a narrow side bar (CSS container queries);
  // this line repeats them there.
  if (env.python_version !== null || env.packages !== null) {
    lines.push(
      <li key="facts" className="jp-kernelprov-narrowFacts">
        {env.python_version !== null && (
          <span className="jp-kernelprov-fact-python">
            {trans.__('Python %1', env.python_version)}
          </span>
        )}
        {env.packages !== null && (
          <span className="jp-kernelprov-fact-packages">
            {trans._n('%1 package', '%1 packages', env.packages)}
          </span>
        )}
      </li>
    );
  }
  for (const problem of env.problems) {
    lines.push(
      <li key={`p-${problem}`} className="jp-kernelprov-problem">
        {problem}
      </li>
    );
  }
  if (env.staging?.error) {
    lines.push(
      <li key="error" className="jp-kernelprov-problem">
        {env.staging.error}
      </li>
    );
  }
  if (env.staged) {
    const staged = env.staged;
    const parts = [
      trans.__('%1 on this node', formatBytes(staged.bytes)),
      trans.__(
        'last used %1',
        Time.formatHuman(new Date(staged.last_used * 1000))
      )
    ];
    if (staged.in_use) {
      parts.push(
        trans._n('in use by %1 kernel', 'in use by %1 kernels', staged.in_use)
      );
    }
    lines.push(
      <li key="staged" title={staged.prefix}>
        {parts.join(' · ')}
        <br />
        <code className="jp-kernelprov-path">{staged.prefix}</code>
      </li>
    );
  }
  return <ul className="jp-kernelprov-details">{lines}</ul>;
}

function EnvironmentRows(props: {
  env: IEnvironment;
  model: EnvironmentsModel;
  actions: IEnvironmentActions;
  trans: TranslationBundle;
}): JSX.Element {
  const { env, model, actions, trans } = props;
  const busyWith = model.busyWith(env.name);
  const busy = busyWith !== undefined;
  const state = stateOf(env, busyWith);
  const blocked = env.problems.length > 0;
  const who = env.display_name;
  return (
    <tbody className="jp-kernelprov-env" data-kernel-name={env.name}>
      <tr>
        <th
          scope="row"
          className="jp-kernelprov-name"
          title={env.archive ?? ''}
        >
          <span className="jp-kernelprov-displayName">{env.display_name}</span>
          <span className="jp-kernelprov-kernelName">{env.name}</span>
        </th>
        <td className="jp-kernelprov-number jp-kernelprov-col-size">
          {formatBytes(env.archive_size)}
        </td>
        <td className="jp-kernelprov-number jp-kernelprov-col-python">
          {env.python_version ?? '—'}
        </td>
        <td className="jp-kernelprov-number jp-kernelprov-col-packages">
          {env.packages ?? '—'}
        </td>
        <StateCell env={env} state={state} trans={trans} />
      </tr>
      <tr className="jp-kernelprov-actionsRow">
        <td colSpan={5}>
          <Details env={env} trans={trans} />
          <div
            className="jp-kernelprov-actions"
            role="group"
            aria-label={trans.__('Actions for %1', who)}
          >
            <button
              type="button"
              className="jp-kernelprov-button jp-mod-accept"
              aria-label={trans.__('Open notebook on %1', who)}
              title={trans.__('Open a new notebook with this kernel')}
              disabled={blocked}
              onClick={() => actions.openNotebook(env)}
            >
              {trans.__('Open notebook')}
            </button>
            <button
              type="button"
              className="jp-kernelprov-button"
              aria-label={trans.__('Stage now: %1', who)}
              title={trans.__(
                'Unpack this environment onto this node now, so kernels start fast'
              )}
              disabled={
                blocked || busy || state === 'ready' || state === 'staging'
              }
              onClick={() => actions.stage(env)}
            >
              {trans.__('Stage now')}
            </button>
            <button
              type="button"
              className="jp-kernelprov-button jp-mod-warn"
              aria-label={trans.__('Evict: %1', who)}
              title={trans.__('Remove the staged copy from this node')}
              disabled={busy || state !== 'ready'}
              onClick={() => actions.evict(env)}
            >
              {trans.__('Evict')}
            </button>
          </div>
        </td>
      </tr>
    </tbody>
  );
}

function EnvironmentsTable(props: {
  model: EnvironmentsModel;
  actions: IEnvironmentActions;
  trans: TranslationBundle;
}): JSX.Element {
  const { model, actions, trans } = props;
  const [filter, setFilter] = React.useState('');
  const all = model.environments;
  const needle = filter.trim().toLowerCase();
  const shown = needle
    ? all.filter(
        env =>
          env.name.toLowerCase().includes(needle) ||
          env.display_name.toLowerCase().includes(needle) ||
          (env.python_version ?? '').includes(needle)
      )
    : all;
  return (
    <div className="jp-kernelprov-body">
      {all.length > FILTER_THRESHOLD && (
        <input
          type="search"
          className="jp-kernelprov-filter jp-mod-styled"
          placeholder={trans.__('Filter environments')}
          aria-label={trans.__('Filter environments')}
          value={filter}
          onChange={event => setFilter(event.target.value)}
        />
      )}
      {model.error && (
        <p className="jp-kernelprov-message jp-kernelprov-problem" role="alert">
          {trans.__('Cannot list environments: %1', model.error)}
        </p>
      )}
      {!model.loading && all.length === 0 && !model.error && (
        <p className="jp-kernelprov-message">
          {trans.__(
            'No packed environments yet. Add one in a terminal with `kernelprov install NAME`.'
          )}
        </p>
      )}
      {shown.length > 0 && (
        <table
          className="jp-kernelprov-table"
          aria-label={trans.__('Packed environments')}
        >
          <thead>
            <tr>
              <th scope="col">{trans.__('Name')}</th>
              <th
                scope="col"
                className="jp-kernelprov-number jp-kernelprov-col-size"
                title={trans.__('Archive size')}
              >
                {trans.__('Size')}
              </th>
              <th
                scope="col"
                className="jp-kernelprov-number jp-kernelprov-col-python"
              >
                {trans.__('Python')}
              </th>
              <th
                scope="col"
                className="jp-kernelprov-number jp-kernelprov-col-packages"
              >
                <abbr title={trans.__('Packages')}>{trans.__('Pkgs')}</abbr>
              </th>
              <th scope="col">{trans.__('State')}</th>
            </tr>
          </thead>
          {shown.map(env => (
            <EnvironmentRows
              key={env.name}
              env={env}
              model={model}
              actions={actions}
              trans={trans}
            />
          ))}
        </table>
      )}
      {needle && shown.length === 0 && all.length > 0 && (
        <p className="jp-kernelprov-message">
          {trans.__('No environment matches “%1”.', filter)}
        </p>
      )}
      {model.cacheDir && (
        <p className="jp-kernelprov-footer">
          {trans.__('Staged under %1', model.cacheDir)}
        </p>
      )}
    </div>
  );
}

/**
 * The table of environments, re-rendered whenever the model changes.
 */
export class EnvironmentsView extends ReactWidget {
  constructor(
    model: EnvironmentsModel,
    actions: IEnvironmentActions,
    trans: TranslationBundle
  ) {
    super();
    this.addClass('jp-kernelprov-view');
    this._model = model;
    this._actions = actions;
    this._trans = trans;
  }

  render(): JSX.Element {
    return (
      <UseSignal signal={this._model.changed}>
        {() => (
          <EnvironmentsTable
            model={this._model}
            actions={this._actions}
            trans={this._trans}
          />
        )}
      </UseSignal>
    );
  }

  private _actions: IEnvironmentActions;
  private _model: EnvironmentsModel;
  private _trans: TranslationBundle;
}
